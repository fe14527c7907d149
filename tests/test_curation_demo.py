"""The pixel copy descriptor, its wiring into embed_images, and the planted-truth demo pool.

Real Fashion-MNIST images (the Debian package), scikit-learn digits and scikit-image textures; the
descriptor is checked against a float64 numpy reference and on real near-copies.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image, ImageFilter

from components.curation import reasons
from components.curation.config import DemoPoolConfig
from components.curation.demo_pool import NEAR_COPY_KINDS, build_curation_demo, near_copy
from components.curation.descriptor import PixelDescriptor, parse_pixel_backbone
from components.curation.embed import EmbedConfig, EmbeddingShards, embed_images
from components.curation.ingest import IngestConfig, ingest_pool
from components.data import fashion_mnist
from components.storage import open_store


def small_demo(prefix: str = "demo") -> DemoPoolConfig:
    return DemoPoolConfig(enabled=True, prefix=prefix, fashion_per_class=6, digits=12, textures=9, exact_copies=4,
                          near_copies=8, seeds_per_class=2, eval_per_class=3, eval_copies=4)


def fashion_images(n: int) -> np.ndarray:
    folder = fashion_mnist.locate(fashion_mnist.INSTALLED_DATA_DIR, Path("/nonexistent"), allow_fetch=False)
    return fashion_mnist.load_split(folder, "train").images[:n]  # (n, 28, 28) uint8


def reference_descriptor(image: Image.Image, size: int) -> np.ndarray:
    """Independent float64 version of the documented recipe (PIL only for the resize and the blur)."""
    gray = image.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(gray, dtype=np.float64)
    detail = a - np.asarray(gray.filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float64)
    parts = []
    for values in (a.ravel(), detail.ravel()):
        centred = values - values.mean()
        parts.append(centred / np.linalg.norm(centred) / np.sqrt(2.0))
    return np.concatenate(parts)


def test_descriptor_matches_a_float64_reference_and_is_brightness_invariant() -> None:
    images = fashion_images(5)
    descriptor = PixelDescriptor(size=16)
    for pixels in images:
        image = Image.fromarray(pixels)
        vector = descriptor.describe(image)
        assert vector.shape == (descriptor.dim,) and vector.dtype == np.float32
        np.testing.assert_allclose(vector, reference_descriptor(image, 16), atol=1e-6)
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    # a constant offset (no clipping) changes neither part: both are mean-centred
    darker = np.clip(images[0].astype(np.int16) // 2, 0, 255).astype(np.uint8)
    lifted = (darker + 40).astype(np.uint8)
    cosine = float(descriptor.describe(Image.fromarray(darker)) @ descriptor.describe(Image.fromarray(lifted)))
    assert cosine > 0.999
    flat = descriptor.describe(Image.new("L", (28, 28), 77))
    assert not np.any(flat)  # a flat image is nobody's copy: zero vector, cosine 0 with everything


def test_descriptor_separates_near_copies_from_distinct_images() -> None:
    images = fashion_images(300)
    descriptor = PixelDescriptor(size=32)
    vectors = np.stack([descriptor.describe(Image.fromarray(p)) for p in images])  # (300, D)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, -1.0)
    nearest_other = similarity.max(axis=1)
    assert np.quantile(nearest_other, 0.95) < 0.96  # distinct images: almost all below the demo threshold
    for kind in ("resize", "jpeg", "brightness"):  # the transforms the descriptor is documented to catch
        copies = np.stack([descriptor.describe(Image.open(io.BytesIO(near_copy(p, kind)[0]))) for p in images[:50]])
        assert np.min(np.sum(copies * vectors[:50], axis=1)) > 0.93, kind


def test_pixel_backbone_spec_and_embed_images_write_descriptor_shards(tmp_path: Path) -> None:
    assert parse_pixel_backbone("pixels:24").size == 24
    for bad in ("pixels:", "pixels:x", "pixels:2"):
        with pytest.raises(ValueError, match="pixels"):
            EmbedConfig(backbone=bad).validate()
    images = fashion_images(7)
    for i, pixels in enumerate(images):
        Image.fromarray(pixels).save(tmp_path / f"img{i}.png")
    (tmp_path / "broken.png").write_bytes(b"gone bad")
    rows = pl.DataFrame({"id": [f"id{i}" for i in range(7)] + ["idbad"],
                         "uri": [(tmp_path / f"img{i}.png").as_uri() for i in range(7)] + [
                             (tmp_path / "broken.png").as_uri()]})
    shards = embed_images(rows, EmbedConfig(backbone="pixels:16", shard_size=3, batch_size=2), tmp_path / "emb")
    reopened = EmbeddingShards.open(tmp_path / "emb")
    assert reopened.dim == 512 and reopened.num_rows == 7 and len(reopened.shards) == 3
    assert reopened.ids() == [f"id{i}" for i in range(7)]
    assert shards.rejected()["reason"].to_list() == [reasons.EMBED_FAILED]
    stacked = np.concatenate([np.asarray(v) for _, v in reopened.iter_shards()])  # (7, 512)
    expected = np.stack([PixelDescriptor(16).describe(Image.fromarray(p)) for p in images])
    np.testing.assert_allclose(stacked, expected, atol=1e-6)


def test_demo_pool_plants_every_kind_and_is_idempotent(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    cfg = small_demo()
    demo = build_curation_demo(cfg, store, tmp_path / "state")
    truth = demo.truth
    counts = dict(truth.group_by("role").len().iter_rows())
    assert counts == {"original": 60, "distractor": 21, "exact_copy": 4, "near_copy": 8, "eval_copy": 4,
                      "corrupt": 4}
    assert sorted(truth.filter(pl.col("role") == "near_copy")["transform"].unique().to_list()) == sorted(
        NEAR_COPY_KINDS)
    originals = set(truth.filter(pl.col("role") == "original")["key"].to_list())
    assert set(truth.filter(pl.col("role").is_in(["exact_copy", "near_copy"]))["original"].to_list()) <= originals
    for key in truth.filter(pl.col("role") == "exact_copy").select("key", "original").iter_rows():
        assert store.read(f"demo/pool/{key[0]}") == store.read(f"demo/pool/{key[1]}")
    seeds = [k for k in store.list("demo/seeds/")]
    assert len(seeds) == 20 and not {k.split("/")[-1] for k in seeds} & {k.split("/")[-1] for k in originals}
    assert len(list(store.list("demo/eval/"))) == 30
    # every corrupt file gets the reason it was planted for, by the real ingest
    ingested = ingest_pool(IngestConfig(pool=demo.pool_uri, workers=2))
    got = dict(ingested.rejected.select("key", "reason").iter_rows())
    for key, expected in truth.filter(pl.col("role") == "corrupt").select("key", "expected_reason").iter_rows():
        assert got[key] == expected
    marker = tmp_path / "store" / "demo" / "demo.json"
    before = marker.stat().st_mtime_ns
    again = build_curation_demo(cfg, store, tmp_path / "state")
    assert marker.stat().st_mtime_ns == before and again.truth.equals(truth)
    # other parameters: rebuilt, and no object of the old demo is left behind
    rebuilt = build_curation_demo(DemoPoolConfig(**{**cfg.__dict__, "digits": 3}), store, tmp_path / "state")
    assert rebuilt.truth.filter(pl.col("source") == "digits").height == 3
    assert len([k for k in store.list("demo/pool/digits/")]) == 3
