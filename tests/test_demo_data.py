"""Demo data: IDX parsing, Fashion-MNIST from the Debian package, the pool in the object store."""

from __future__ import annotations

import gzip
import io
import struct
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from components.data import fashion_mnist
from components.data.demo_pool import DemoDataConfig, FashionMnistConfig, build_demo_pool
from components.data.idx import IdxFormatError, parse_idx, read_idx_gz
from components.storage import LocalObjectStore, StoreLocator


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(parse_idx(idx_bytes(array)), array)
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(array)))
    parsed, raw = read_idx_gz(path)
    assert np.array_equal(parsed, array) and raw == idx_bytes(array)


@pytest.mark.parametrize(
    ("data", "message"),
    [(b"\x01\x00\x08\x01", "bad magic"), (b"\x00\x00\x07\x01" + b"\x00" * 4, "unknown IDX element type"),
     (b"\x00\x00\x08\x03\x00", "truncated IDX header"),
     (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc", "payload is 3 bytes")],
)
def test_parse_idx_rejects_malformed(data: bytes, message: str) -> None:
    with pytest.raises(IdxFormatError, match=message):
        parse_idx(data)


def test_not_gzip_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(b"not gzip")
    with pytest.raises(IdxFormatError, match="not a readable gzip"):
        read_idx_gz(path)


def test_balanced_subset_is_seeded_and_balanced() -> None:
    labels = np.repeat(np.arange(10), 30)
    first = fashion_mnist.balanced_subset(labels, 5, seed=1)
    assert np.array_equal(first, fashion_mnist.balanced_subset(labels, 5, seed=1))
    assert np.bincount(labels[first]).tolist() == [5] * 10
    assert len(fashion_mnist.balanced_subset(labels, 0, seed=1)) == 300


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real dataset: installed package, or fetched through apt (the code path users get)."""
    return fashion_mnist.locate(fashion_mnist.INSTALLED_DATA_DIR, tmp_path_factory.mktemp("cache"))


def test_real_fashion_mnist_verifies_and_reads(fmnist_dir: Path) -> None:
    test = fashion_mnist.load_split(fmnist_dir, "test")
    assert test.images.shape == (10_000, 28, 28) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10


def test_checksum_mismatch_is_reported(fmnist_dir: Path, tmp_path: Path) -> None:
    for name in fashion_mnist.IDX_SHA256:
        (tmp_path / name).write_bytes((fmnist_dir / name).read_bytes())
    _, raw = read_idx_gz(tmp_path / "t10k-labels-idx1-ubyte.gz")
    tampered = bytearray(raw)
    tampered[-1] = (tampered[-1] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(tampered)))
    with pytest.raises(fashion_mnist.ChecksumError, match=r"t10k-labels-idx1-ubyte\.gz: sha256"):
        fashion_mnist.load_split(tmp_path, "test")


def test_locate_without_fetch_says_how_to_get_it(tmp_path: Path) -> None:
    with pytest.raises(fashion_mnist.DatasetUnavailableError, match="dataset-fashion-mnist"):
        fashion_mnist.locate(tmp_path / "none", tmp_path / "cache", allow_fetch=False)


def test_demo_pool_layout(fmnist_dir: Path, tmp_path: Path) -> None:
    config = DemoDataConfig(
        prefix="pool/demo",
        manifest="data/pool.parquet",
        metrics="metrics/data.json",
        fashion_mnist=FashionMnistConfig(source_dir=str(fmnist_dir), train_per_class=3, test_per_class=1),
        photos=["astronaut", "camera"],
    )
    store = LocalObjectStore(tmp_path / "store")
    result = build_demo_pool(config, store, state=tmp_path / "state", root=tmp_path)
    frame = pl.read_parquet(result.manifest_path)
    assert frame.height == 30 + 10 + 2
    assert result.counts == {"fashion-mnist_test": 10, "fashion-mnist_train": 30, "scikit-image_photos": 2,
                             "total": 42}
    assert frame["id"].n_unique() == frame.height
    keys = set(store.list("pool/demo/"))
    assert "pool/demo/labels.parquet" in keys
    assert len([k for k in keys if k.startswith("pool/demo/fashion-mnist/train/")]) == 30
    assert pl.read_parquet(io.BytesIO(store.read("pool/demo/labels.parquet"))).equals(frame)

    row = frame.filter(pl.col("split") == "test").row(0, named=True)
    assert (frame["uri"] == frame["key"]).all()  # a key of the store, never this checkout's absolute path
    image = Image.open(io.BytesIO(StoreLocator.for_store(store).read(row["uri"])))
    assert image.size == (28, 28) and image.mode == "L"
    index = int(row["id"].rsplit("-", 1)[1])
    expected = fashion_mnist.load_split(fmnist_dir, "test")
    assert np.array_equal(np.asarray(image), expected.images[index])
    assert row["label"] == int(expected.labels[index])
    assert row["class_name"] == fashion_mnist.CLASS_NAMES[row["label"]]
    photo = frame.filter(pl.col("id") == "photo-astronaut").row(0, named=True)
    assert (photo["width"], photo["height"]) == (512, 512)
    assert (tmp_path / "metrics" / "data.json").is_file()
