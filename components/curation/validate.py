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
from components.storage import ObjectStore

# Which decoder formats each extension may legitimately hold. Pillow reports multi-picture JPEGs
# (many phone cameras) as MPO; they are still JPEG files.
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
    decoders: tuple[str, ...]  # only these Pillow plugins are tried, so exotic ones cannot claim text files


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
    format: str | None = None
    mode: str | None = None


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


def _short(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MESSAGE_LIMIT]


def check_object(store: ObjectStore, key: str, rules: ValidationRules) -> Checked:
    """Validate ``key``; never raises for a bad file (a bad file is a rejection, not a crash)."""
    uri = store.url_for(key)
    ext = extension_of(key)
    if ext not in rules.extension_formats:
        allowed = ", ".join(sorted(rules.extension_formats))
        return Checked(key, uri, reasons.UNSUPPORTED_EXTENSION, f"extension {ext!r} is not one of: {allowed}")
    try:
        data = store.read(key)
    except Exception as exc:  # any store failure (missing, permissions, network) rejects just this file
        return Checked(key, uri, reasons.UNREADABLE, _short(exc))
    if not data:
        return Checked(key, uri, reasons.ZERO_BYTES, "the file is empty", bytes=0)
    digest = hashlib.sha256(data).hexdigest()
    return _decode(Checked(key, uri, sha256=digest, bytes=len(data)), data, ext, rules)


def _rejected(seen: Checked, reason: str, message: str) -> Checked:
    return dataclasses.replace(seen, reason=reason, message=message)


def _decode(base: Checked, data: bytes, ext: str, rules: ValidationRules) -> Checked:
    """Header checks first (cheap), then a full decode: ``verify()`` misses truncated pixel data."""
    try:
        image = Image.open(io.BytesIO(data), formats=rules.decoders)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return _rejected(base, reasons.DECOMPRESSION_BOMB, _short(exc))
    except UnidentifiedImageError:
        message = f"no decoder among {', '.join(rules.decoders)} recognises the bytes"
        return _rejected(base, reasons.NOT_AN_IMAGE, message)
    except Exception as exc:  # a recognised but malformed header
        return _rejected(base, reasons.NOT_AN_IMAGE, _short(exc))
    with image:
        width, height = image.size
        seen = dataclasses.replace(base, width=width, height=height, format=image.format, mode=image.mode)
        if image.format not in rules.extension_formats[ext]:
            return _rejected(seen, reasons.WRONG_EXTENSION, f"extension .{ext} but the content is {image.format}")
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
        return dataclasses.replace(seen, mode=image.mode)  # the mode can change once decoded
