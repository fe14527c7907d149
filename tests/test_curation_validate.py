"""Validation of single files: the format is decided from the bytes, and a cut file is `truncated` under any name.

Real images made with Pillow in every accepted format, whole, renamed, cut in the header and cut
before their end marker.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.curation import reasons
from components.curation.ingest import DEFAULT_EXTENSIONS
from components.curation.validate import Checked, ValidationRules, check_object, make_rules, sniff_format
from components.storage import LocalObjectStore

RULES = make_rules(list(DEFAULT_EXTENSIONS), max_pixels=1_000_000, min_side=1)
FORMATS = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
OTHER_EXTENSION = {"JPEG": "png", "PNG": "jpg", "GIF": "webp", "WEBP": "gif", "BMP": "tiff", "TIFF": "bmp"}


def noise(seed: int, height: int = 24, width: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


WHOLE = {fmt: encode(noise(i), fmt) for i, fmt in enumerate(FORMATS)}


def check(tmp_path: Path, name: str, data: bytes, rules: ValidationRules = RULES) -> Checked:
    store = LocalObjectStore(str(tmp_path / "pool"))
    store.write(name, data)
    return check_object(store, name, rules)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_whole_image_is_kept_under_its_own_name_and_under_another(tmp_path: Path, fmt: str) -> None:
    own = check(tmp_path, f"own.{FORMATS[fmt]}", WHOLE[fmt])
    assert (own.reason, own.format, own.extension_mismatch, own.width, own.height) == (None, fmt, False, 32, 24)
    renamed = check(tmp_path, f"renamed.{OTHER_EXTENSION[fmt]}", WHOLE[fmt])
    assert (renamed.reason, renamed.format, renamed.extension_mismatch) == (None, fmt, True)
    assert (renamed.width, renamed.height, renamed.sha256) == (32, 24, own.sha256)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cut", ["header", "half", "tail"])
def test_a_cut_image_is_truncated_whatever_its_extension(tmp_path: Path, fmt: str, cut: str) -> None:
    data = WHOLE[fmt]
    # header: inside the header (for PNG, right after IHDR); tail: only the last bytes are missing
    end = {"header": 33, "half": len(data) // 2, "tail": len(data) - 1}[cut]
    for name in (f"cut.{FORMATS[fmt]}", f"cut.{OTHER_EXTENSION[fmt]}"):
        got = check(tmp_path, name, data[:end])
        assert got.reason == reasons.TRUNCATED, (name, got.message)
        assert got.format == fmt and got.message and got.sha256


def test_png_cut_right_after_ihdr_and_png_without_iend(tmp_path: Path) -> None:
    png = WHOLE["PNG"]
    assert png[12:16] == b"IHDR" and png[-8:-4] == b"IEND"
    after_ihdr = check(tmp_path, "ihdr.jpg", png[:33])  # 8 signature + 25 IHDR chunk bytes
    assert (after_ihdr.reason, after_ihdr.format) == (reasons.TRUNCATED, "PNG")
    no_iend = check(tmp_path, "no-iend.png", png[:-12])  # every pixel is there, the IEND chunk is not
    assert no_iend.reason == reasons.TRUNCATED and "IEND" in no_iend.message
    assert Image.open(io.BytesIO(png[:-12])).load() is not None  # Pillow alone would have kept it


def test_gif_without_trailer_and_animation_with_a_cut_last_frame(tmp_path: Path) -> None:
    gif = WHOLE["GIF"]
    assert gif.endswith(b";")
    assert check(tmp_path, "no-trailer.gif", gif[:-1]).reason == reasons.TRUNCATED
    frames = [noise(20 + i) for i in range(3)]
    animated = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], comment=b"three frames")
    assert check(tmp_path, "anim.gif", animated).reason is None
    got = check(tmp_path, "anim-cut.gif", animated[: len(animated) - 300])
    assert got.reason == reasons.TRUNCATED and "trailer" in got.message


def test_bytes_after_the_end_marker_are_not_a_truncation(tmp_path: Path) -> None:
    for fmt in ("JPEG", "PNG", "GIF"):
        got = check(tmp_path, f"junk.{FORMATS[fmt]}", WHOLE[fmt] + b"appended by some tool")
        assert (got.reason, got.format) == (None, fmt)


def test_multi_picture_jpeg_named_jpg_is_no_mismatch(tmp_path: Path) -> None:
    mpo = encode(noise(30), "MPO", save_all=True, append_images=[noise(31)])
    got = check(tmp_path, "phone.jpg", mpo)
    assert (got.reason, got.format, got.extension_mismatch) == (None, "MPO", False)


@pytest.mark.parametrize(("name", "data"), [
    ("random.jpg", np.random.default_rng(5).bytes(4000)),
    ("random.png", np.random.default_rng(6).bytes(40)),
    ("error.jpg", b"<html><body>404 Not Found</body></html>\n" * 4),
    ("car.bmp", b"BMW is a car maker, this is not a bitmap\n"),
])
def test_bytes_of_no_image_format_are_not_an_image(tmp_path: Path, name: str, data: bytes) -> None:
    got = check(tmp_path, name, data)
    assert (got.reason, got.format) == (reasons.NOT_AN_IMAGE, None)
    assert sniff_format(data) is None


def test_an_image_of_a_format_that_is_not_accepted_is_not_an_image(tmp_path: Path) -> None:
    only_png = make_rules(["png"], max_pixels=1_000_000, min_side=1)
    got = check(tmp_path, "photo.png", WHOLE["JPEG"], only_png)
    assert (got.reason, got.format) == (reasons.NOT_AN_IMAGE, "JPEG")
    assert check(tmp_path, "cut.png", WHOLE["JPEG"][:100], only_png).reason == reasons.NOT_AN_IMAGE


def test_other_reasons_still_come_first(tmp_path: Path) -> None:
    tiny_rules = make_rules(list(DEFAULT_EXTENSIONS), max_pixels=100, min_side=30)
    assert check(tmp_path, "empty.jpg", b"").reason == reasons.ZERO_BYTES
    assert check(tmp_path, "big.jpg", WHOLE["PNG"], tiny_rules).reason == reasons.DECOMPRESSION_BOMB
    small = make_rules(list(DEFAULT_EXTENSIONS), max_pixels=1_000_000, min_side=30)
    got = check(tmp_path, "small.jpg", WHOLE["PNG"], small)
    assert (got.reason, got.format, got.extension_mismatch) == (reasons.TOO_SMALL, "PNG", True)
    assert check(tmp_path, "notes.txt", b"a caption, no image").reason == reasons.UNSUPPORTED_EXTENSION


@pytest.mark.parametrize("name", ["saved-as.txt", "download", "picture.dat"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_an_image_under_a_non_image_name_is_validated_by_its_bytes(tmp_path: Path, fmt: str, name: str) -> None:
    kept = check(tmp_path, name, WHOLE[fmt])
    assert (kept.reason, kept.format, kept.extension_mismatch, kept.width, kept.height) == (None, fmt, True, 32, 24)
    cut = check(tmp_path, f"cut-{name}", WHOLE[fmt][: len(WHOLE[fmt]) // 2])
    assert (cut.reason, cut.format) == (reasons.TRUNCATED, fmt)


@pytest.mark.parametrize("data", [b"", b"caption: a cat\n", b'{"label": 3}', bytes(range(256))])
def test_a_non_image_under_a_non_image_name_is_rejected_for_its_extension(tmp_path: Path, data: bytes) -> None:
    got = check(tmp_path, "sidecar.json", data)
    assert got.reason == reasons.UNSUPPORTED_EXTENSION and "'json'" in got.message and got.bytes == len(data)
