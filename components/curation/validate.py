"""Validate one pool object: read it, hash it, decode it fully, and say why it is rejected (if it is)."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from components.curation import reasons
from components.storage import ObjectStore, StoreUnavailableError

# Which decoder formats each extension names. The configured extensions say which files are
# candidates and which formats are accepted; the format of a file is decided from its bytes, so a
# PNG named .jpg is kept (with ``extension_mismatch``). Pillow reports multi-picture JPEGs (many
# phone cameras) as MPO; they are still JPEG files.
EXTENSION_FORMATS: dict[str, tuple[str, ...]] = {
    "jpg": ("JPEG", "MPO"),
    "jpeg": ("JPEG", "MPO"),
    "png": ("PNG",),
    "webp": ("WEBP",),
    "bmp": ("BMP",),
    "gif": ("GIF",),
    "tif": ("TIFF",),
    "tiff": ("TIFF",),
}
MESSAGE_LIMIT = 300  # decoder errors can be long; the table stays readable


@dataclass(frozen=True)
class ValidationRules:
    """What a valid image is: allowed extensions (with their formats), size limits, usable decoders."""

    extension_formats: dict[str, tuple[str, ...]]
    max_pixels: int
    min_side: int
    decoders: tuple[str, ...]  # the accepted formats: only these Pillow plugins are tried, so exotic
    # ones cannot claim text files


def make_rules(extensions: list[str], max_pixels: int, min_side: int) -> ValidationRules:
    """Rules for ``extensions`` (case-insensitive, with or without a dot); unknown ones raise."""
    normalized = sorted({ext.lower().lstrip(".") for ext in extensions})
    unknown = [ext for ext in normalized if ext not in EXTENSION_FORMATS]
    if unknown:
        raise ValueError(f"no known image format for extensions {unknown}; supported: {sorted(EXTENSION_FORMATS)}")
    mapping = {ext: EXTENSION_FORMATS[ext] for ext in normalized}
    Image.init()  # register every plugin so we can drop formats this Pillow build cannot decode
    wanted = sorted({fmt for formats in mapping.values() for fmt in formats})
    decoders = tuple(fmt for fmt in wanted if fmt in Image.OPEN)
    return ValidationRules(extension_formats=mapping, max_pixels=max_pixels, min_side=min_side, decoders=decoders)


@dataclass(frozen=True)
class Checked:
    """The outcome for one object: ``reason`` is None when the image is kept."""

    key: str
    uri: str
    reason: str | None = None
    message: str = ""
    sha256: str | None = None
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None  # decided from the bytes, not from the name
    mode: str | None = None
    extension_mismatch: bool | None = None  # the extension names another format than the bytes hold


@contextlib.contextmanager
def pil_pixel_limit(max_pixels: int) -> Iterator[None]:
    """Make Pillow refuse images above ``max_pixels`` for the duration of the block, then restore.

    Pillow keeps the limit in a module attribute and only *warns* between 1x and 2x of it, so the
    warning is escalated to an error too. Both are process-wide: enter this once around a whole
    run (worker threads see it), not per image, and do not run two ingests with different limits
    in one process at the same time.
    """
    previous = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def extension_of(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


_TIFF_PREFIXES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF, both byte orders
_BMP_HEADER_SIZES = (12, 16, 40, 52, 56, 64, 108, 124)  # the DIB header variants (BITMAPINFOHEADER is 40)


def sniff_format(data: bytes) -> str | None:
    """The image format the bytes start with (Pillow's name), from magic numbers alone; None if none.

    Used when Pillow cannot open a file, to tell a cut-off or damaged image (``truncated``) from
    bytes that are no image at all (``not_an_image``). BMP's two-letter magic is backed by the
    header's reserved bytes (zero) and DIB header size, so a text file starting "BM" is not a BMP.
    """
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in _TIFF_PREFIXES:
        return "TIFF"
    reserved_zero = not data[6:10].strip(b"\x00")
    dib_size = int.from_bytes(data[14:18], "little") if len(data) >= 18 else None
    if data[:2] == b"BM" and reserved_zero and dib_size in (None, *_BMP_HEADER_SIZES):
        return "BMP"
    return None


def _png_complete(data: bytes) -> bool:
    """Whether the PNG's chunk chain reaches IEND (Pillow decodes a PNG that lacks it without complaint)."""
    pos = 8  # after the signature
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        chunk_type = data[pos + 4:pos + 8]
        pos += 12 + length  # length, type, data, crc
        if pos > len(data):
            return False
        if chunk_type == b"IEND":
            return True
    return False


def _gif_complete(data: bytes) -> bool:
    """Whether the GIF's blocks reach the trailer (Pillow decodes the first frame of a cut GIF)."""
    def skip_sub_blocks(pos: int) -> int:
        while pos < len(data):
            size = data[pos]
            pos += 1 + size
            if size == 0:
                return pos
        return len(data) + 1  # ran off the end

    flags = data[10] if len(data) > 10 else 0
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, screen descriptor, global colours
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:  # trailer
            return True
        if block == 0x21:  # extension: introducer, label, sub-blocks
            pos = skip_sub_blocks(pos + 2)
        elif block == 0x2C:  # image: descriptor, local colours, LZW code size, sub-blocks
            if pos + 10 > len(data):
                return False
            flags = data[pos + 9]
            pos = skip_sub_blocks(pos + 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0))
        else:
            pos += 1  # stray byte: Pillow skips it too
    return False


def missing_tail(data: bytes, fmt: str) -> str | None:
    """Why a file that Pillow decoded is nonetheless cut short, or None when it is complete.

    Pillow itself notices a cut in JPEG, BMP and TIFF pixel data, and cannot open a cut WebP; a PNG
    without IEND or a GIF without its trailer it decodes silently, so those are checked here.
    """
    if fmt == "PNG" and not _png_complete(data):
        return "the PNG ends before its IEND chunk"
    if fmt == "GIF" and not _gif_complete(data):
        return "the GIF ends before its trailer"
    if fmt == "WEBP" and len(data) < 8 + int.from_bytes(data[4:8], "little"):
        return "the WebP is shorter than its RIFF header says"
    return None


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MESSAGE_LIMIT]


def check_object(store: ObjectStore, key: str, rules: ValidationRules) -> Checked:
    """Validate ``key``; never raises for a bad file (a bad file is a rejection, not a crash).

    Every listed file is read, whatever its name: a file whose bytes start as an accepted format is
    validated as an image (kept with ``extension_mismatch``, or ``truncated`` when cut), so a crawl
    that saved a PNG as ``.txt`` or without an extension loses nothing. Only files whose bytes are no
    accepted format are rejected for their extension."""
    uri = store.url_for(key)
    ext = extension_of(key)
    try:
        data = store.read(key)
    except StoreUnavailableError:
        raise  # the store is down, not the file bad: stop the run rather than reject what is left
    except Exception as exc:  # any other store failure (missing, permissions) rejects just this file
        return Checked(key, uri, reasons.UNREADABLE, _short(exc))
    if ext not in rules.extension_formats and sniff_format(data) not in rules.decoders:
        # Another extension (or none) holding no accepted image: a sidecar, a text file, a video.
        allowed = ", ".join(sorted(rules.extension_formats))
        message = f"extension {ext!r} is not one of: {allowed}, and the bytes are no accepted image format"
        return Checked(key, uri, reasons.UNSUPPORTED_EXTENSION, message, bytes=len(data))
    if not data:
        return Checked(key, uri, reasons.ZERO_BYTES, "the file is empty", bytes=0)
    digest = hashlib.sha256(data).hexdigest()
    return _decode(Checked(key, uri, sha256=digest, bytes=len(data)), data, ext, rules)


def _rejected(seen: Checked, reason: str, message: str) -> Checked:
    return dataclasses.replace(seen, reason=reason, message=message)


def _unopened(base: Checked, data: bytes, rules: ValidationRules, exc: Exception) -> Checked:
    """Pillow could not open the bytes: truncated when they start like an accepted format, else not an image."""
    fmt = sniff_format(data)
    detail = "" if isinstance(exc, UnidentifiedImageError) else f" ({_short(exc)})"
    if fmt in rules.decoders:
        message = f"starts as a {fmt} file but cannot be opened: cut off or damaged{detail}"
        return _rejected(dataclasses.replace(base, format=fmt), reasons.TRUNCATED, message)
    if fmt is not None:
        message = f"the bytes are a {fmt} file, not one of the accepted formats {', '.join(rules.decoders)}"
        return _rejected(dataclasses.replace(base, format=fmt), reasons.NOT_AN_IMAGE, message)
    message = f"the bytes are none of the accepted formats {', '.join(rules.decoders)}{detail}"
    return _rejected(base, reasons.NOT_AN_IMAGE, message)


def _decode(base: Checked, data: bytes, ext: str, rules: ValidationRules) -> Checked:
    """Header checks first (cheap), then a full decode: ``verify()`` misses truncated pixel data.

    The format comes from the bytes (Pillow, restricted to the accepted formats); the extension only
    sets ``extension_mismatch``.
    """
    try:
        image = Image.open(io.BytesIO(data), formats=rules.decoders)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _rejected(base, reasons.DECOMPRESSION_BOMB, _short(exc))
    except Exception as exc:  # unrecognised bytes, or a recognised but cut-off or malformed header
        return _unopened(base, data, rules, exc)
    with image:
        width, height = image.size
        fmt = image.format or ""
        mismatch = fmt not in rules.extension_formats.get(ext, ())
        seen = dataclasses.replace(base, width=width, height=height, format=fmt, mode=image.mode,
                                   extension_mismatch=mismatch)
        if width * height > rules.max_pixels:
            message = f"{width}x{height} = {width * height} pixels > max_pixels {rules.max_pixels}"
            return _rejected(seen, reasons.DECOMPRESSION_BOMB, message)
        if min(width, height) < rules.min_side:
            message = f"{width}x{height}: shorter side < min_side {rules.min_side}"
            return _rejected(seen, reasons.TOO_SMALL, message)
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return _rejected(seen, reasons.DECOMPRESSION_BOMB, _short(exc))
        except Exception as exc:
            return _rejected(seen, reasons.TRUNCATED, _short(exc))
        cut = missing_tail(data, fmt)
        if cut:
            return _rejected(seen, reasons.TRUNCATED, cut)
        return dataclasses.replace(seen, mode=image.mode)  # the mode can change once decoded
