"""A raw demo pool with planted truth, so the curation stage can be checked against known answers.

Layout in the object store (under ``prefix``)::

    pool/fashion/fm-train-00042.png     Fashion-MNIST train images (the content we want)
    pool/digits/digit-0005.png          scikit-learn digits, 8x8 upscaled to 28x28 (distractors)
    pool/textures/gravel-003.png        28x28 patches of scikit-image textures (distractors)
    pool/copies/exact-000.png           same bytes as a pool image under another key
    pool/copies/near-jpeg-001.jpg       crop+resize / resize / JPEG / brightness variants of pool images
    pool/copies/evalcopy-crop-000.png   the same variants of evaluation images (relative dedup must find them)
    pool/corrupt/...                    zero bytes, truncated PNG, text named .png, truncated JPEG named .png
    seeds/fm-train-01234.png            curated seed set (Fashion-MNIST train images not in the pool)
    eval/fm-test-00007.png              evaluation set (Fashion-MNIST test images)
    truth.parquet                       every planted pool item and its original (TRUTH_SCHEMA)
    labels.parquet                      key, label, class_name of the pool images (keys relative to pool/)
    demo.json                           the parameters it was built from; written last (idempotence marker)
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageEnhance

from components.curation import reasons
from components.curation.config import DemoPoolConfig
from components.data import fashion_mnist
from components.storage import ObjectStore, join_key

SIDE = 28  # every generated image is 28x28 like Fashion-MNIST, so size alone gives nothing away
NEAR_COPY_KINDS = ("crop", "resize", "jpeg", "brightness")
TEXTURES = ("brick", "grass", "gravel")
LAYOUT_VERSION = 2  # 2: the JPEG named .png is cut short (a whole one is now kept by ingest)
TRUTH_SCHEMA = pl.Schema({
    "key": pl.Utf8,  # relative to the pool root (as ingest's `key`)
    "role": pl.Utf8,  # original | distractor | exact_copy | near_copy | eval_copy | corrupt
    "source": pl.Utf8,  # fashion-mnist | digits | texture | (for copies and corrupt files: their origin)
    "original": pl.Utf8,  # copies: the pool key (near/exact) or the eval key relative to the demo prefix
    "transform": pl.Utf8,  # near/eval copies: crop | resize | jpeg | brightness
    "expected_reason": pl.Utf8,  # corrupt files: the ingest reason code they must get
})
LABELS_SCHEMA = pl.Schema({"key": pl.Utf8, "label": pl.Int32, "class_name": pl.Utf8})


@dataclass(frozen=True)
class DemoPool:
    pool_uri: str
    seeds_uri: str
    eval_uri: str
    labels_uri: str
    truth: pl.DataFrame  # TRUTH_SCHEMA


@dataclass(frozen=True)
class Planted:
    key: str  # relative to the demo prefix
    payload: bytes
    role: str
    source: str
    original: str | None = None
    transform: str | None = None
    expected_reason: str | None = None
    label: int = -1
    class_name: str = ""


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(image: Image.Image, quality: int = 75) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def near_copy(pixels: np.ndarray, kind: str) -> tuple[bytes, str]:
    """(encoded bytes, extension) of a near-copy of a (28, 28) uint8 image."""
    image = Image.fromarray(pixels)
    if kind == "crop":  # one pixel off the left and top, resized back: content shifts by about a pixel
        cropped = image.crop((1, 1, SIDE, SIDE)).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        return png_bytes(np.asarray(cropped)), "png"
    if kind == "resize":  # a larger rendition: self-dedup keeps the copy with the most pixels
        return png_bytes(np.asarray(image.resize((42, 42), Image.Resampling.BICUBIC))), "png"
    if kind == "jpeg":
        return jpeg_bytes(image), "jpg"
    if kind == "brightness":
        return png_bytes(np.asarray(ImageEnhance.Brightness(image).enhance(1.2))), "png"
    raise ValueError(f"unknown near-copy kind {kind!r}")


def digit_images(count: int) -> list[np.ndarray]:
    """scikit-learn's bundled 8x8 digits (0..16), rescaled to 0..255 and upscaled to 28x28."""
    from sklearn.datasets import load_digits

    digits = load_digits().images[:count]  # (n, 8, 8) float 0..16
    return [np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((SIDE, SIDE), Image.Resampling.BILINEAR))
            for d in digits]


def texture_patches(count: int, rng: np.random.Generator) -> list[tuple[str, np.ndarray]]:
    """(texture name, (28, 28) patch) at random offsets of scikit-image's 512x512 textures."""
    import skimage.data

    sources = {name: getattr(skimage.data, name)() for name in TEXTURES}
    patches = []
    for i in range(count):
        name = TEXTURES[i % len(TEXTURES)]
        top, left = (int(v) for v in rng.integers(0, 512 - SIDE, size=2))
        patches.append((name, np.ascontiguousarray(sources[name][top:top + SIDE, left:left + SIDE])))
    return patches


def corrupt_files(example_png: bytes, example_pixels: np.ndarray) -> list[Planted]:
    """One file per planted failure, each with the ingest reason it must get."""
    example_jpeg = jpeg_bytes(Image.fromarray(example_pixels))

    def bad(name: str, payload: bytes, reason: str) -> Planted:
        return Planted(f"pool/corrupt/{name}", payload, "corrupt", "corrupt", expected_reason=reason)

    return [
        bad("empty.png", b"", reasons.ZERO_BYTES),
        bad("truncated.png", example_png[: len(example_png) * 6 // 10], reasons.TRUNCATED),
        bad("notes.png", b"this is a text file, not an image\n", reasons.NOT_AN_IMAGE),
        # ingest decides the format from the bytes: a whole JPEG named .png would be kept, a cut one is truncated
        bad("cut-jpeg.png", example_jpeg[: len(example_jpeg) // 2], reasons.TRUNCATED),
    ]


def planted_items(cfg: DemoPoolConfig, folder: Path) -> Iterator[Planted]:
    """Every object of the demo, in a fixed order (deterministic for a given config)."""
    rng = np.random.default_rng(cfg.seed)
    train = fashion_mnist.load_split(folder, "train")
    test = fashion_mnist.load_split(folder, "test")
    # Pool and seeds come from disjoint train images: a seed must retrieve its neighbours, not itself.
    chosen = fashion_mnist.balanced_subset(train.labels, cfg.fashion_per_class + cfg.seeds_per_class, cfg.seed)
    order = rng.permutation(len(chosen))
    seed_rows = np.sort(chosen[order[: cfg.seeds_per_class * 10]])
    pool_rows = np.sort(chosen[order[cfg.seeds_per_class * 10:]])
    originals: list[Planted] = []
    pixels_of: dict[str, np.ndarray] = {}
    for index in pool_rows:
        label = int(train.labels[index])
        pixels_of[f"pool/fashion/fm-train-{int(index):05d}.png"] = train.images[index]
        originals.append(Planted(f"pool/fashion/fm-train-{int(index):05d}.png", png_bytes(train.images[index]),
                                 "original", "fashion-mnist", label=label,
                                 class_name=fashion_mnist.CLASS_NAMES[label]))
    yield from originals
    for i, pixels in enumerate(digit_images(cfg.digits)):
        yield Planted(f"pool/digits/digit-{i:04d}.png", png_bytes(pixels), "distractor", "digits", class_name="digit")
    for i, (name, pixels) in enumerate(texture_patches(cfg.textures, rng)):
        yield Planted(f"pool/textures/{name}-{i:03d}.png", png_bytes(pixels), "distractor", "texture",
                      class_name="texture")
    for i, j in enumerate(rng.choice(len(originals), size=min(cfg.exact_copies, len(originals)), replace=False)):
        src = originals[int(j)]
        yield Planted(f"pool/copies/exact-{i:03d}.png", src.payload, "exact_copy", src.source, original=src.key,
                      label=src.label, class_name=src.class_name)
    for i, j in enumerate(rng.choice(len(originals), size=min(cfg.near_copies, len(originals)), replace=False)):
        src, kind = originals[int(j)], NEAR_COPY_KINDS[i % len(NEAR_COPY_KINDS)]
        payload, ext = near_copy(pixels_of[src.key], kind)
        yield Planted(f"pool/copies/near-{kind}-{i:03d}.{ext}", payload, "near_copy", src.source, original=src.key,
                      transform=kind, label=src.label, class_name=src.class_name)
    yield from corrupt_files(originals[0].payload, train.images[int(pool_rows[0])])
    for index in seed_rows:
        label = int(train.labels[index])
        yield Planted(f"seeds/fm-train-{int(index):05d}.png", png_bytes(train.images[index]), "seed", "fashion-mnist",
                      label=label, class_name=fashion_mnist.CLASS_NAMES[label])
    eval_rows = fashion_mnist.balanced_subset(test.labels, cfg.eval_per_class, cfg.seed)
    for index in eval_rows:
        yield Planted(f"eval/fm-test-{int(index):05d}.png", png_bytes(test.images[index]), "eval", "fashion-mnist")
    for i, index in enumerate(rng.choice(eval_rows, size=min(cfg.eval_copies, len(eval_rows)), replace=False)):
        kind = NEAR_COPY_KINDS[i % len(NEAR_COPY_KINDS)]
        payload, ext = near_copy(test.images[int(index)], kind)
        label = int(test.labels[int(index)])
        yield Planted(f"pool/copies/evalcopy-{kind}-{i:03d}.{ext}", payload, "eval_copy", "fashion-mnist",
                      original=f"eval/fm-test-{int(index):05d}.png", transform=kind, label=label,
                      class_name=fashion_mnist.CLASS_NAMES[label])


def pool_relative(key: str) -> str:
    return key[len("pool/"):]


def truth_frame(items: list[Planted]) -> pl.DataFrame:
    rows = [{"key": pool_relative(p.key), "role": p.role, "source": p.source,
             "original": pool_relative(p.original) if p.original and p.original.startswith("pool/") else p.original,
             "transform": p.transform, "expected_reason": p.expected_reason}
            for p in items if p.key.startswith("pool/")]
    return pl.DataFrame(rows, schema=TRUTH_SCHEMA).sort("key")


def labels_frame(items: list[Planted]) -> pl.DataFrame:
    rows = [{"key": pool_relative(p.key), "label": p.label, "class_name": p.class_name}
            for p in items if p.key.startswith("pool/") and p.role != "corrupt"]
    return pl.DataFrame(rows, schema=LABELS_SCHEMA).sort("key")


def parquet_bytes(frame: pl.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return buffer.getvalue()


def demo_fingerprint(cfg: DemoPoolConfig) -> str:
    # Where Fashion-MNIST is read from does not change the images (their sha256 sums are checked).
    fields = {k: v for k, v in asdict(cfg).items() if k not in ("source_dir", "cache_dir", "allow_fetch", "enabled")}
    fields["layout"] = LAYOUT_VERSION  # what is planted changed without a parameter changing: rebuild
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def build_curation_demo(cfg: DemoPoolConfig, store: ObjectStore, state: Path, workers: int = 8) -> DemoPool:
    """Write the demo pool, seeds, eval set, truth and labels to ``store`` under ``cfg.prefix``.

    Idempotent: when ``demo.json`` (written last) records the same parameters, nothing is written.
    """
    cfg.validate()
    marker = join_key(cfg.prefix, "demo.json")
    fingerprint = demo_fingerprint(cfg)
    done = store.exists(marker) and json.loads(store.read(marker)).get("fingerprint") == fingerprint
    if not done:
        for key in list(store.list(cfg.prefix + "/")):  # other parameters: no stale object may stay in the pool
            store.delete(key)
        cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else state / "cache" / "fashion-mnist"
        folder = fashion_mnist.locate(Path(cfg.source_dir), cache_dir, allow_fetch=cfg.allow_fetch)
        items = list(planted_items(cfg, folder))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(lambda p: store.write(join_key(cfg.prefix, p.key), p.payload), items))
        store.write(join_key(cfg.prefix, "truth.parquet"), parquet_bytes(truth_frame(items)))
        store.write(join_key(cfg.prefix, "labels.parquet"), parquet_bytes(labels_frame(items)))
        store.write(marker, json.dumps({"fingerprint": fingerprint, "params": asdict(cfg)}, sort_keys=True).encode())
    truth = pl.read_parquet(io.BytesIO(store.read(join_key(cfg.prefix, "truth.parquet"))))
    return DemoPool(pool_uri=store.url_for(join_key(cfg.prefix, "pool")),
                    seeds_uri=store.url_for(join_key(cfg.prefix, "seeds")),
                    eval_uri=store.url_for(join_key(cfg.prefix, "eval")),
                    labels_uri=store.url_for(join_key(cfg.prefix, "labels.parquet")), truth=truth)


__all__ = ["LABELS_SCHEMA", "NEAR_COPY_KINDS", "TRUTH_SCHEMA", "DemoPool", "build_curation_demo", "score_against_truth"]


def survivor_of(ingest_kept: pl.DataFrame, rejected: pl.DataFrame) -> dict[str, str]:
    """Pool key -> the key of the image that stands for it after exact and near dedup (itself if kept)."""
    key_of_uri = dict(zip(ingest_kept["uri"].to_list(), ingest_kept["key"].to_list(), strict=True))
    key_of_id = dict(zip(ingest_kept["id"].to_list(), ingest_kept["key"].to_list(), strict=True))
    step: dict[str, str] = {k: k for k in ingest_kept["key"].to_list()}
    for key, reason, target in rejected.select("key", "reason", "duplicate_of").iter_rows():
        if reason == reasons.EXACT_DUPLICATE:
            step[key] = key_of_uri.get(target, target)
        elif reason == reasons.NEAR_DUPLICATE:
            step[key] = key_of_id.get(target, target)

    def follow(key: str) -> str:
        for _ in range(4):  # exact copy -> its survivor -> that one's near-dedup keeper: two hops at most
            key = step.get(key, key)
        return key

    return {key: follow(key) for key in step}


def score_against_truth(truth: pl.DataFrame, ingest_kept: pl.DataFrame, rejected: pl.DataFrame,
                        manifest: pl.DataFrame) -> dict[str, float]:
    """Duplicate precision/recall, eval-leak precision/recall, corrupt-file reasons and the share of the
    manifest that is Fashion-MNIST, all against the planted truth."""
    survivor = survivor_of(ingest_kept, rejected)
    role = dict(zip(truth["key"].to_list(), truth["role"].to_list(), strict=True))
    original = dict(zip(truth["key"].to_list(), truth["original"].to_list(), strict=True))

    def group(key: str) -> str:
        return original[key] if role.get(key) in ("exact_copy", "near_copy", "eval_copy") and original.get(key) \
            else key

    metrics: dict[str, float] = {}
    pairs = truth.filter(pl.col("role").is_in(["exact_copy", "near_copy"]))
    for label, subset in [("exact", pairs.filter(pl.col("role") == "exact_copy")),
                          ("near", pairs.filter(pl.col("role") == "near_copy")),
                          *[(f"near_{kind}", pairs.filter(pl.col("transform") == kind)) for kind in NEAR_COPY_KINDS]]:
        found = [survivor.get(k) is not None and survivor.get(k) == survivor.get(o)
                 for k, o in subset.select("key", "original").iter_rows()]
        metrics[f"dup_recall_{label}"] = float(np.mean(found)) if found else float("nan")
    near = rejected.filter(pl.col("reason") == reasons.NEAR_DUPLICATE)
    right = [group(k) == group(survivor.get(k, k)) for k in near["key"].to_list()]
    metrics["dup_precision_near"] = float(np.mean(right)) if right else float("nan")
    leaks = set(rejected.filter(pl.col("reason") == reasons.EVAL_LEAK)["key"].to_list())
    planted = set(truth.filter(pl.col("role") == "eval_copy")["key"].to_list())
    metrics["eval_leak_recall"] = len(leaks & planted) / len(planted) if planted else float("nan")
    metrics["eval_leak_precision"] = len(leaks & planted) / len(leaks) if leaks else float("nan")
    corrupt = truth.filter(pl.col("role") == "corrupt").join(rejected.select("key", "reason"), on="key", how="left")
    matches = [a == b for a, b in corrupt.select("reason", "expected_reason").iter_rows()]
    metrics["corrupt_reason_accuracy"] = float(np.mean(matches)) if matches else float("nan")
    sources = manifest.select("key").join(truth.select("key", "source", "role"), on="key", how="left")
    fashion = sources.filter(pl.col("source") == "fashion-mnist").height
    metrics["manifest_fashion_share"] = fashion / sources.height if sources.height else float("nan")
    distractors = truth.filter(pl.col("role") == "distractor")["key"]
    metrics["distractors_in_manifest"] = float(manifest.filter(pl.col("key").is_in(distractors.to_list())).height)
    return metrics
