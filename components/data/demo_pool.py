"""The demo image pool: real Fashion-MNIST images and scikit-image photos written to the object store.

Layout in the store (under ``prefix``)::

    fashion-mnist/train/fmnist-train-00042.png   one PNG per image (id = split + source index)
    fashion-mnist/test/fmnist-test-00007.png
    photos/photo-astronaut.png
    labels.parquet                               id, key, uri, split, label, class_name, ...

The same table is written to a local manifest (a DVC output). Nothing large goes into git. Its ``uri``
is the object's key in the store, resolved against the configured store when read, so the manifest is
the same file in every checkout.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from components.data import fashion_mnist
from components.data.photos import BUNDLED_PHOTOS, load_photo
from components.storage import ObjectStore, join_key
from components.storage.atomic import write_parquet_atomic

MANIFEST_SCHEMA = {
    "id": pl.Utf8,
    "key": pl.Utf8,  # key in the object store, portable across checkouts and store locations
    # Where readers find the image: a key resolved against the configured store (here always the key;
    # components/storage/locations.py). Never an absolute path: this table is a DVC output.
    "uri": pl.Utf8,
    "source": pl.Utf8,
    "split": pl.Utf8,
    "label": pl.Int32,
    "class_name": pl.Utf8,
    "width": pl.Int32,
    "height": pl.Int32,
    "bytes": pl.Int64,
    "sha256": pl.Utf8,
}


@dataclass
class FashionMnistConfig:
    source_dir: str = str(fashion_mnist.INSTALLED_DATA_DIR)
    cache_dir: str = ""  # empty: <state>/cache/fashion-mnist
    train_per_class: int = 200  # 0 = the whole split (6,000 per class)
    test_per_class: int = 50  # 0 = the whole split (1,000 per class)
    seed: int = 0
    allow_fetch: bool = True  # apt-get install / download the Debian package when missing

    def validate(self) -> None:
        if self.train_per_class < 0 or self.test_per_class < 0:
            raise ValueError("train_per_class and test_per_class must be >= 0")


@dataclass
class DemoDataConfig:
    prefix: str = "pool/demo"
    manifest: str = "data/demo/pool.parquet"
    metrics: str = "metrics/data.json"
    fashion_mnist: FashionMnistConfig = field(default_factory=FashionMnistConfig)
    photos: list[str] = field(default_factory=lambda: list(BUNDLED_PHOTOS))
    write_workers: int = 8

    def validate(self) -> None:
        if self.write_workers < 1:
            raise ValueError("write_workers must be >= 1")
        unknown = sorted(set(self.photos) - set(BUNDLED_PHOTOS))
        if unknown:
            raise ValueError(f"photos {unknown} are not bundled with scikit-image; choose from {BUNDLED_PHOTOS}")


@dataclass(frozen=True)
class PoolImage:
    """One image to publish: its id, key in the store and manifest fields."""

    id: str
    key: str
    pixels: np.ndarray  # (H, W) or (H, W, 3) uint8
    source: str
    split: str
    label: int
    class_name: str


@dataclass(frozen=True)
class DemoDataResult:
    manifest_path: Path
    labels_uri: str
    counts: dict[str, int]

    def summary(self) -> dict[str, object]:
        """The data stage's result as the CLI prints it, the flow returns it and its report shows it."""
        return {"manifest": str(self.manifest_path), "labels_uri": self.labels_uri, "counts": self.counts}


def encode_png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def fashion_mnist_images(cfg: FashionMnistConfig, folder: Path, prefix: str) -> Iterator[PoolImage]:
    for split, per_class in (("train", cfg.train_per_class), ("test", cfg.test_per_class)):
        data = fashion_mnist.load_split(folder, split)
        for index in fashion_mnist.balanced_subset(data.labels, per_class, cfg.seed):
            image_id = f"fmnist-{split}-{int(index):05d}"
            label = int(data.labels[index])
            yield PoolImage(
                id=image_id,
                key=join_key(prefix, "fashion-mnist", split, f"{image_id}.png"),
                pixels=data.images[index],
                source="fashion-mnist",
                split=split,
                label=label,
                class_name=fashion_mnist.CLASS_NAMES[label],
            )


def photo_images(names: Iterable[str], prefix: str) -> Iterator[PoolImage]:
    for name in names:
        image_id = f"photo-{name}"
        yield PoolImage(
            id=image_id,
            key=join_key(prefix, "photos", f"{image_id}.png"),
            pixels=load_photo(name),
            source="scikit-image",
            split="photos",
            label=-1,
            class_name=name,
        )


def publish(image: PoolImage, store: ObjectStore) -> dict[str, Any]:
    """Encode one image as PNG, write it to the store, and return its manifest row."""
    payload = encode_png(image.pixels)
    store.write(image.key, payload)
    height, width = image.pixels.shape[:2]
    return {
        "id": image.id,
        "key": image.key,
        "uri": image.key,  # the pool is written to the configured store: its key is the portable reference
        "source": image.source,
        "split": image.split,
        "label": image.label,
        "class_name": image.class_name,
        "width": width,
        "height": height,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }


def build_demo_pool(cfg: DemoDataConfig, store: ObjectStore, state: Path, root: Path) -> DemoDataResult:
    """Fetch Fashion-MNIST (if needed), write the pool and labels table, return where they went."""
    fm = cfg.fashion_mnist
    cache_dir = Path(fm.cache_dir) if fm.cache_dir else state / "cache" / "fashion-mnist"
    folder = fashion_mnist.locate(Path(fm.source_dir), cache_dir, allow_fetch=fm.allow_fetch)
    images = [*fashion_mnist_images(fm, folder, cfg.prefix), *photo_images(cfg.photos, cfg.prefix)]
    with ThreadPoolExecutor(max_workers=cfg.write_workers) as pool:
        rows = list(pool.map(lambda image: publish(image, store), images))
    frame = pl.DataFrame(rows, schema=MANIFEST_SCHEMA).sort("id")
    manifest_path = root / cfg.manifest
    write_parquet_atomic(frame, manifest_path)
    labels_key = join_key(cfg.prefix, "labels.parquet")
    store.write(labels_key, manifest_path.read_bytes())
    counts = {
        f"{source}_{split}": int(n)
        for source, split, n in frame.group_by(["source", "split"]).len().sort(["source", "split"]).iter_rows()
    } | {"total": frame.height}
    metrics_path = root / cfg.metrics
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps({"data": counts}, indent=2, sort_keys=True) + "\n")
    return DemoDataResult(manifest_path=manifest_path, labels_uri=store.url_for(labels_key), counts=counts)
