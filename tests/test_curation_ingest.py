"""Ingest, validation and exact dedup of a real raw image pool (real PNG/JPEG bytes, real files, real stores)."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from components.curation import (
    KEPT_SCHEMA,
    REASONS,
    REJECTED_SCHEMA,
    IngestConfig,
    ReconciliationError,
    ingest_pool,
    stats_markdown,
    write_ingest_outputs,
)
from components.curation.ingest import reconcile
from components.storage import LocalObjectStore, open_store

MAX_PIXELS = 10_000  # small so a 200x200 image is a "bomb" without allocating gigabytes
MIN_SIDE = 8


def encode(pixels: np.ndarray, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def pool_files(with_broken_link: bool = True) -> dict[str, bytes | None]:
    """key -> bytes (None = a broken symbolic link) for a pool with one file per failure mode."""
    photo_jpeg = encode(noise(64, 64, 1), "JPEG", quality=90)
    files: dict[str, bytes | None] = {
        "a/cat.png": encode(noise(40, 48, 2), "PNG"),
        "a/dog.JPG": photo_jpeg,  # upper-case extension is accepted
        "b/copy-of-dog.jpg": photo_jpeg,  # exact duplicate: a/dog.JPG sorts first and is kept
        "z/again-dog.jpeg": photo_jpeg,  # a second duplicate of the same bytes
        "a/gray.png": encode(noise(32, 32, 3, channels=1), "PNG"),
        "a/nested/deeper/bird.jpeg": encode(noise(30, 50, 4), "JPEG"),
        "a/empty.png": b"",
        "a/notes.jpg": b"this is a plain text file, not a JPEG\n" * 5,
        "a/cut.jpg": photo_jpeg[: len(photo_jpeg) // 2],
        "a/cut.png": encode(noise(64, 64, 5), "PNG")[:600],
        "a/really-jpeg.png": encode(noise(24, 24, 6), "JPEG"),  # kept: the format comes from the bytes
        "a/really-png.jpg": encode(noise(20, 28, 11), "PNG"),  # kept, with extension_mismatch
        "a/cut-jpeg.png": encode(noise(40, 40, 12), "JPEG")[:700],  # a cut JPEG is truncated under any name
        "a/header-only.png": encode(noise(16, 16, 13), "PNG")[:33],  # signature + IHDR, nothing after
        "a/random.jpg": np.random.default_rng(14).bytes(2000),  # no image format at all
        "a/huge.png": encode(np.zeros((200, 200), dtype=np.uint8), "PNG"),  # 40,000 px > MAX_PIXELS
        "a/tiny.png": encode(noise(4, 4, 7), "PNG"),
        "a/readme.txt": b"not part of the pool\n",
        "a/no-extension": b"\x00\x01 no image bytes either\n",
        "a/saved-as.txt": encode(noise(16, 16, 8), "PNG"),  # kept: a PNG under a non-image name
        "a/cut-jpeg.dat": encode(noise(40, 40, 15), "JPEG")[:700],  # truncated, whatever the name
        ".hidden/secret.png": encode(noise(16, 16, 9), "PNG"),  # hidden: never listed
        "a/.DS_Store": b"\x00\x01",  # hidden: never listed
        "a/download.png.part": encode(noise(16, 16, 10), "PNG"),  # temp: never listed
    }
    if with_broken_link:
        files["a/gone.png"] = None
    return files


EXPECTED_REASONS = {
    "b/copy-of-dog.jpg": "exact_duplicate",
    "z/again-dog.jpeg": "exact_duplicate",
    "a/empty.png": "zero_bytes",
    "a/notes.jpg": "not_an_image",
    "a/cut.jpg": "truncated",
    "a/cut.png": "truncated",
    "a/cut-jpeg.png": "truncated",
    "a/header-only.png": "truncated",
    "a/random.jpg": "not_an_image",
    "a/huge.png": "decompression_bomb",
    "a/tiny.png": "too_small",
    "a/readme.txt": "unsupported_extension",
    "a/no-extension": "unsupported_extension",
    "a/cut-jpeg.dat": "truncated",
    "a/gone.png": "unreadable",
}
EXPECTED_KEPT = {"a/cat.png", "a/dog.JPG", "a/gray.png", "a/nested/deeper/bird.jpeg", "a/really-jpeg.png",
                 "a/really-png.jpg", "a/saved-as.txt"}
# kept although the name says otherwise
MISMATCHED = {"a/really-jpeg.png": "JPEG", "a/really-png.jpg": "PNG", "a/saved-as.txt": "PNG"}


def write_pool(root: Path, files: dict[str, bytes | None]) -> Path:
    for key, data in files.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            path.symlink_to(root / "does-not-exist.png")
        else:
            path.write_bytes(data)
    return root


def config(pool: str, **overrides: object) -> IngestConfig:
    base: dict[str, object] = {"pool": pool, "max_pixels": MAX_PIXELS, "min_side": MIN_SIDE, "workers": 4,
                               "batch_size": 3}
    return IngestConfig(**{**base, **overrides})  # type: ignore[arg-type]


def outcome(kept: pl.DataFrame, rejected: pl.DataFrame) -> tuple[set[str], dict[str, str]]:
    return set(kept["key"]), dict(zip(rejected["key"], rejected["reason"], strict=True))


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    return write_pool(tmp_path / "pool", pool_files())


def test_every_file_is_kept_or_rejected_with_its_reason(pool: Path) -> None:
    result = ingest_pool(config(str(pool)))
    kept_keys, reasons = outcome(result.kept, result.rejected)
    assert kept_keys == EXPECTED_KEPT
    assert reasons == EXPECTED_REASONS
    assert set(EXPECTED_REASONS.values()) == set(REASONS)  # the pool exercises every reason code
    assert result.kept.schema == KEPT_SCHEMA and result.rejected.schema == REJECTED_SCHEMA

    steps = result.stats["steps"]
    assert steps == {"listed": 22, "valid": 9, "kept": 7, "rejected": 15}
    assert steps["listed"] == steps["kept"] + steps["rejected"]
    assert set(result.kept["key"]) | set(result.rejected["key"]) == set(EXPECTED_KEPT) | set(EXPECTED_REASONS)
    assert result.rejected["reason"].is_not_null().all() and result.rejected["message"].str.len_chars().min() > 0
    assert result.stats["rejected_by_reason"]["exact_duplicate"] == 2
    assert result.stats["rejected_by_reason"]["truncated"] == 5
    assert result.stats["kept_by_format"] == {"JPEG": 3, "PNG": 4}
    assert result.stats["kept_extension_mismatch"] == 3
    assert "wrong_extension" not in result.stats["rejected_by_reason"]  # retired: such files are kept


def test_kept_rows_describe_the_decoded_images(pool: Path) -> None:
    kept = ingest_pool(config(str(pool))).kept
    rows = {row["key"]: row for row in kept.iter_rows(named=True)}
    cat = rows["a/cat.png"]
    data = (pool / "a/cat.png").read_bytes()
    assert (cat["width"], cat["height"], cat["format"], cat["mode"], cat["bytes"]) == (48, 40, "PNG", "RGB", len(data))
    assert cat["uri"] == (pool / "a/cat.png").resolve().as_uri()
    assert cat["id"] == cat["sha256"][:24]
    assert rows["a/gray.png"]["mode"] == "L"
    for key, row in rows.items():  # the format is decided from the bytes; the name only sets the flag
        assert row["extension_mismatch"] is (key in MISMATCHED), key
    for key, fmt in MISMATCHED.items():
        assert rows[key]["format"] == fmt
        assert Image.open(pool / key).format == fmt
    assert (rows["a/really-png.jpg"]["width"], rows["a/really-png.jpg"]["height"]) == (28, 20)
    assert kept["id"].n_unique() == kept.height
    assert kept["key"].to_list() == sorted(kept["key"])


def test_rejections_carry_what_was_learnt(pool: Path) -> None:
    rejected = ingest_pool(config(str(pool))).rejected
    rows = {row["key"]: row for row in rejected.iter_rows(named=True)}
    # a truncated file records the format its bytes start with, whatever its name
    assert rows["a/cut-jpeg.png"]["format"] == "JPEG" and rows["a/cut.jpg"]["format"] == "JPEG"
    assert rows["a/header-only.png"]["format"] == "PNG" and "PNG" in rows["a/header-only.png"]["message"]
    assert rows["a/random.jpg"]["format"] is None and rows["a/notes.jpg"]["format"] is None
    assert "40000 pixels" in rows["a/huge.png"]["message"]  # Pillow refuses it before decoding anything
    kept_dog = (pool / "a/dog.JPG").resolve().as_uri()
    for key in ("b/copy-of-dog.jpg", "z/again-dog.jpeg"):
        assert rows[key]["duplicate_of"] == kept_dog
        assert kept_dog in rows[key]["message"]
    assert rows["a/empty.png"]["bytes"] == 0
    assert all(row["message"] for row in rows.values())


def test_dedup_choice_and_tables_do_not_depend_on_threads_or_batches(pool: Path) -> None:
    first = ingest_pool(config(str(pool), workers=1, batch_size=1))
    second = ingest_pool(config(pool.as_uri(), workers=8, batch_size=1000))  # file:// form of the same pool
    assert first.kept.equals(second.kept)
    assert first.rejected.equals(second.rejected)


def test_pixel_limit_is_restored_and_a_larger_limit_keeps_the_big_image(pool: Path) -> None:
    before = Image.MAX_IMAGE_PIXELS
    result = ingest_pool(config(str(pool), max_pixels=100_000))
    assert before == Image.MAX_IMAGE_PIXELS
    assert "a/huge.png" in set(result.kept["key"])


def test_outputs_are_written_atomically(pool: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = ingest_pool(config(str(pool)))
    out = tmp_path / "out"
    paths = write_ingest_outputs(result, out)
    assert sorted(p.name for p in out.iterdir()) == ["kept.parquet", "rejects.parquet", "stats.json"]
    assert pl.read_parquet(paths["kept.parquet"]).equals(result.kept)
    assert pl.read_parquet(paths["rejects.parquet"]).equals(result.rejected)
    assert json.loads(paths["stats.json"].read_text()) == result.stats
    previous = paths["kept.parquet"].read_bytes()

    def crash_midway(self: pl.DataFrame, file: str | Path, **kwargs: object) -> None:
        Path(file).write_bytes(b"PAR1 half written")
        raise OSError("disk full")

    monkeypatch.setattr(pl.DataFrame, "write_parquet", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_ingest_outputs(result, out)
    assert paths["kept.parquet"].read_bytes() == previous  # the old table is untouched
    assert sorted(os.listdir(out)) == ["kept.parquet", "rejects.parquet", "stats.json"]  # no temp left


def test_report_is_a_readable_markdown_table(pool: Path) -> None:
    text = stats_markdown(ingest_pool(config(str(pool))).stats)
    assert "| listed | 22 | 100.0% |" in text
    assert "Kept with an extension that names another format: 3." in text
    assert "| `exact_duplicate` | 2 |" in text
    assert all(f"`{code}`" in text for code in REASONS)


def test_reconciliation_failure_raises() -> None:
    with pytest.raises(ReconciliationError, match="listed 5 != kept 3 \\+ rejected 1"):
        reconcile("validation", 5, 3, 1)


def test_missing_local_pool_is_an_error_not_an_empty_pool(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ingest_pool(config(str(tmp_path / "nope")))
    assert not (tmp_path / "nope").exists()


def test_a_format_that_is_not_accepted_is_not_an_image_whatever_the_name(pool: Path) -> None:
    result = ingest_pool(config(str(pool), extensions=["png"]))  # JPEG is not accepted now
    rows = {row["key"]: row for row in result.rejected.iter_rows(named=True)}
    assert rows["a/really-jpeg.png"]["reason"] == "not_an_image" and rows["a/really-jpeg.png"]["format"] == "JPEG"
    assert rows["a/cut-jpeg.png"]["reason"] == "not_an_image"  # a cut JPEG is no truncated PNG
    assert rows["a/header-only.png"]["reason"] == "truncated"
    # PNG bytes are accepted under any name (.jpg, .txt); JPEG bytes under a non-png name are not candidates
    assert set(result.kept["key"]) == {"a/cat.png", "a/gray.png", "a/really-png.jpg", "a/saved-as.txt"}
    assert rows["a/dog.JPG"]["reason"] == "unsupported_extension"
    assert result.stats["steps"]["listed"] == result.kept.height + result.rejected.height


def test_unknown_extension_in_config_is_rejected(pool: Path) -> None:
    with pytest.raises(ValueError, match="no known image format"):
        ingest_pool(config(str(pool), extensions=["png", "heic"]))


def upload(files: dict[str, bytes | None], store_uri: str) -> None:
    store = open_store(store_uri, create_bucket=store_uri.startswith("s3://"))
    for key, data in files.items():
        if data is not None:
            store.write(key, data)


def test_pool_in_an_object_store_gives_the_same_outcome(pool: Path, tmp_path: Path) -> None:
    local = ingest_pool(config(str(pool)))
    store_root = tmp_path / "store"
    upload(pool_files(with_broken_link=False), str(store_root))
    # Through the generic listing path (store.list), not the local walk.
    opened = ingest_pool(config(str(store_root)), store_opener=lambda uri: _ListingOnly(LocalObjectStore(uri)))
    expected_reasons = {k: v for k, v in EXPECTED_REASONS.items() if k != "a/gone.png"}
    assert outcome(opened.kept, opened.rejected) == (EXPECTED_KEPT, expected_reasons)
    assert opened.kept.drop("uri").equals(local.kept.drop("uri"))


class _ListingOnly:
    """A LocalObjectStore seen only through the ObjectStore protocol (so ingest uses store.list())."""

    def __init__(self, inner: LocalObjectStore) -> None:
        self._inner = inner
        self.uri = inner.uri
        self.url_for = inner.url_for
        self.read = inner.read
        self.write = inner.write
        self.list = inner.list
        self.exists = inner.exists


@pytest.mark.s3
def test_pool_in_s3_gives_the_same_outcome(pool: Path, bucket_uri: str) -> None:
    local = ingest_pool(config(str(pool)))
    upload(pool_files(with_broken_link=False), bucket_uri)
    remote = ingest_pool(config(bucket_uri, workers=4, batch_size=5))
    expected_reasons = {k: v for k, v in EXPECTED_REASONS.items() if k != "a/gone.png"}
    assert outcome(remote.kept, remote.rejected) == (EXPECTED_KEPT, expected_reasons)
    assert remote.kept.drop("uri").equals(local.kept.drop("uri"))
    assert remote.kept.filter(pl.col("key") == "a/cat.png")["uri"].item() == f"{bucket_uri}/a/cat.png"
    dup = remote.rejected.filter(pl.col("key") == "b/copy-of-dog.jpg")["duplicate_of"].item()
    assert dup == f"{bucket_uri}/a/dog.JPG"
