"""Copy detection on planted benchmarks: does a descriptor find edited copies without merging distinct images?

    .venv/bin/python benchmarks/copy_detection.py --backbone pixels:32 --backbone pixels:16 --backbone pixels:64 \
        --out benchmarks/results/copy_detection.json

Three domains, each a pool of distinct images:

* ``fashion-mnist``: Fashion-MNIST train images (28x28 grey; a seeded subset of ``--pool-size``);
* ``digits``: all 1,797 scikit-learn digits (8x8, upscaled to 28x28 as in the curation demo): small
  grey images of handwriting, the kind of pool whose distinct "1"s a pixel threshold merges;
* ``photos``: non-overlapping ``--tile`` px tiles of the photos bundled with scikit-image (grey and
  RGB; tiles with a grey standard deviation under 10 are dropped: a flat tile has no identity).

For each domain and each ``--backbone`` (any ``embed.backbone`` string: ``pixels:<size>``, a backbone
folder, ``state_dict:...``), with the edit family of components/curation/copy_edits.py at its default
strengths (crops up to 20% of a side, rescaling 0.5-2x, JPEG quality 50-95, brightness / contrast /
saturation +-30%, rotations up to 5 degrees, flips, overlaid text):

1. a **calibration sample** of the pool gets one random copy each; the threshold is chosen on it
   exactly as the curate stage's calibration does (components/curation/calibrate.py: lowest
   threshold with balanced precision >= ``--target-precision``);
2. a disjoint **test sample** gets one random copy each (other seeds), and one copy per single edit;
3. at the calibrated threshold the real self-dedup (k-NN graph, k = 64, connected components) runs
   on the pool plus the test copies. **Recall**: share of test copies that end up in the same
   component as their original. **Removed**: distinct pool images lost, i.e. the sum over components
   of (distinct pool images in it - 1), over the pool size. Targets: recall >= 0.9, removed <= 1%.
   Pool images that are genuinely near-identical (Fashion-MNIST has some) count as removed.

Per edit: the share of single-edit copies above the threshold (which edits break the descriptor).
The ROC-like curve (recall and false-removal rate of the calibration sample at every threshold) goes
into the JSON (subsampled) and the PNG (recall against false removal, one panel per domain).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from components.curation.calibrate import (  # noqa: E402
    CalibrateConfig,
    CalibrationScores,
    ThresholdCurve,
    calibrate_from_scores,
    nearest_other,
    operating_point,
)
from components.curation.copy_edits import EDIT_NAMES, CopyEditConfig, apply_edits, copy_rng, random_copy  # noqa: E402
from components.curation.dedup_near import near_dedup_from_vectors  # noqa: E402
from components.curation.embed import EmbedConfig, Embedder, describe_images, load_embedder  # noqa: E402
from components.curation.knn_graph import InMemoryVectors  # noqa: E402

TEST_SEED_OFFSET = 1_000  # test copies use other generators than calibration copies
EDIT_SEED_OFFSET = 2_000  # single-edit copies: one more family of generators per edit
CURVE_POINTS = 60  # points of each curve kept in the JSON
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    images: list[Image.Image]


# ------------------------------------------------------------------------------- the domains


def fashion_pool_rows(n_images: int, pool_size: int, seed: int) -> np.ndarray:
    """The Fashion-MNIST train rows the fashion domain uses (sorted): trainers of a descriptor leave them out."""
    return np.sort(np.random.default_rng(seed).choice(n_images, size=min(pool_size, n_images), replace=False))


def fashion_domain(pool_size: int, seed: int) -> Domain:
    from components.data import fashion_mnist

    folder = fashion_mnist.locate(fashion_mnist.INSTALLED_DATA_DIR, Path("/nonexistent"), allow_fetch=False)
    images = fashion_mnist.load_split(folder, "train").images  # (60000, 28, 28) uint8
    chosen = fashion_pool_rows(len(images), pool_size, seed)
    return Domain("fashion-mnist", f"{len(chosen)} Fashion-MNIST train images, 28x28 grey",
                  [Image.fromarray(images[i], mode="L") for i in chosen])


def digits_domain() -> Domain:
    from components.curation.demo_pool import digit_images

    images = [Image.fromarray(d, mode="L") for d in digit_images(1797)]
    return Domain("digits", f"{len(images)} scikit-learn digits, 8x8 upscaled to 28x28 grey", images)


def photo_tiles(tile: int) -> Domain:
    from components.data.photos import BUNDLED_PHOTOS, load_photo

    tiles = []
    for name in BUNDLED_PHOTOS:
        photo = load_photo(name)  # (H, W) or (H, W, 3) uint8
        grey = photo if photo.ndim == 2 else photo.mean(axis=-1)  # (H, W)
        for top in range(0, photo.shape[0] - tile + 1, tile):
            for left in range(0, photo.shape[1] - tile + 1, tile):
                if grey[top:top + tile, left:left + tile].std() >= 10:
                    tiles.append(Image.fromarray(np.ascontiguousarray(photo[top:top + tile, left:left + tile])))
    return Domain("photos", f"{len(tiles)} {tile}x{tile} tiles of the scikit-image photos (grey and RGB)", tiles)


# ------------------------------------------------------------------------------- measuring


def split_samples(n: int, n_calibration: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint sorted calibration and test samples of pool rows (each at most a third of the pool)."""
    order = np.random.default_rng(seed + 1).permutation(n)
    n_cal, n_test = min(n_calibration, n // 3), min(n_test, n // 3)
    return np.sort(order[:n_cal]), np.sort(order[n_cal:n_cal + n_test])


def copies_of(images: list[Image.Image], rows: np.ndarray, seed: int, edits: CopyEditConfig,
              only: str | None = None) -> tuple[list[Image.Image], list[str]]:
    """One copy per row: a random combination (``only`` None) or the single edit ``only``."""
    out, names = [], []
    for row in rows:
        rng = copy_rng(seed, int(row))
        if only is None:
            copy, applied = random_copy(images[int(row)], rng, edits)
        else:
            copy, applied = apply_edits(images[int(row)], (only,), rng, edits), (only,)
        out.append(copy)
        names.append("+".join(applied))
    return out, names


def pair_scores(originals: np.ndarray, copies: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", originals, copies).astype(np.float64)  # (n,) cosine of each pair


def dedup_outcome(pool: np.ndarray, copies: np.ndarray, rows: np.ndarray, threshold: float) -> dict[str, Any]:
    """The real self-dedup on pool + copies at ``threshold``: copy recall and the distinct images lost."""
    ids = [f"p{i}" for i in range(len(pool))] + [f"c{i}" for i in range(len(copies))]
    vectors = np.concatenate([pool, copies]).astype(np.float32)  # (N + n, D)
    assignment = near_dedup_from_vectors(ids, vectors, k=64, threshold=float(min(1.0, threshold)))
    component = dict(zip(assignment["id"].to_list(), assignment["component"].to_list(), strict=True))
    found = [component[f"c{j}"] == component[f"p{int(row)}"] for j, row in enumerate(rows)]
    originals = assignment.filter(pl.col("id").str.starts_with("p")).group_by("component").len()
    lost = int((originals["len"] - 1).clip(lower_bound=0).sum())
    return {"recall": float(np.mean(found)), "removed": lost, "removed_share": lost / len(pool),
            "largest_component": int(assignment["component_size"].max() or 0)}


def curve_json(curve: ThresholdCurve) -> dict[str, list[float]]:
    """The curve at CURVE_POINTS thresholds spread over its recall range (enough to redraw it)."""
    keep = np.unique(np.linspace(0, len(curve.thresholds) - 1, CURVE_POINTS).round().astype(int))
    return {"threshold": [round(float(v), 5) for v in curve.thresholds[keep]],
            "recall": [round(float(v), 4) for v in curve.recall[keep]],
            "false_removal": [round(float(v), 4) for v in curve.false_removal[keep]]}


def measure(domain: Domain, backbone: str, args: argparse.Namespace, edits: CopyEditConfig) -> dict[str, Any]:
    started = time.perf_counter()
    embed = EmbedConfig(backbone=backbone, image_size=args.image_size, batch_size=64,
                        device=args.device, num_threads=args.threads)
    embedder: Embedder = load_embedder(embed)

    def describe(images: list[Image.Image]) -> np.ndarray:
        return describe_images(images, embed, embedder)  # (n, D)

    pool = describe(domain.images)  # (N, D)
    source = InMemoryVectors([str(i) for i in range(len(pool))], pool)
    cal_rows, test_rows = split_samples(len(pool), args.calibration, args.test, args.seed)

    cal_copies, cal_edits = copies_of(domain.images, cal_rows, args.seed, edits)
    distinct, neighbours = nearest_other(source, pool[cal_rows], cal_rows)
    scores = CalibrationScores(ids=[str(r) for r in cal_rows], copy_scores=pair_scores(pool[cal_rows],
                               describe(cal_copies))[:, None], copy_edits=[[e] for e in cal_edits],
                               distinct_scores=distinct, neighbour_ids=neighbours, pool_rows=len(pool))
    cfg = CalibrateConfig(target_precision=args.target_precision, eval_target_precision=args.target_precision)
    fixed = {f"{t:g}": t for t in args.also_threshold}
    calibration = calibrate_from_scores(scores, cfg, fixed)
    threshold = calibration.near_dedup.point.threshold

    test_copies, _ = copies_of(domain.images, test_rows, args.seed + TEST_SEED_OFFSET, edits)
    test_vectors = describe(test_copies)  # (n, D)
    test_pairs = pair_scores(pool[test_rows], test_vectors)  # (n,)
    test_distinct, _ = nearest_other(source, pool[test_rows], test_rows)
    per_edit = {}
    for k, edit in enumerate(EDIT_NAMES):
        single, _ = copies_of(domain.images, test_rows, args.seed + EDIT_SEED_OFFSET + k, edits, only=edit)
        per_edit[edit] = round(float(np.mean(pair_scores(pool[test_rows], describe(single)) > threshold)), 4)

    def at(t: float) -> dict[str, Any]:
        point = operating_point(test_pairs, test_distinct, t)
        return {"threshold": t, **dedup_outcome(pool, test_vectors, test_rows, t), "pair_recall": point.recall,
                "sample_false_removal": point.false_removal}

    test = at(threshold)
    return {"dim": embedder.dim, "threshold": threshold, "target_reached": calibration.near_dedup.reached,
            "calibration": calibration.near_dedup.point.summary(),
            "test": {**test, "recall_by_edit": per_edit},
            "meets_targets": bool(test["recall"] >= 0.9 and test["removed_share"] <= 0.01),
            "at_fixed_thresholds": {name: at(t) for name, t in fixed.items()},
            "curve": curve_json(calibration.curve), "seconds": round(time.perf_counter() - started, 1)}


# ------------------------------------------------------------------------------- the picture


def draw_panels(results: dict[str, Any], backbones: list[str], path: Path) -> None:
    """One panel per domain: recall (y) against false-removal rate (x, log scale from 0.001), one line per backbone."""
    panel_w, panel_h, pad = 340, 260, 50
    domains = list(results)
    canvas = Image.new("RGB", (len(domains) * (panel_w + pad) + pad, panel_h + 2 * pad + 20 * len(backbones)),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    lo, hi = -3.0, 0.0  # log10 of the false-removal rate

    def xy(left: int, false_removal: float, recall: float) -> tuple[float, float]:
        x = (np.log10(max(false_removal, 10 ** lo)) - lo) / (hi - lo)
        return left + x * panel_w, pad + (1.0 - recall) * panel_h

    for d, domain in enumerate(domains):
        left = pad + d * (panel_w + pad)
        draw.rectangle((left, pad, left + panel_w, pad + panel_h), outline=(0, 0, 0))
        draw.text((left, pad - 34), domain, fill=(0, 0, 0))
        draw.text((left, pad - 20), "recall vs false removal (log)", fill=(90, 90, 90))
        for tick in (0.001, 0.01, 0.1, 1.0):
            x, _ = xy(left, tick, 0)
            draw.line((x, pad, x, pad + panel_h), fill=(225, 225, 225))
            draw.text((x - 12, pad + panel_h + 4), f"{tick:g}", fill=(0, 0, 0))
        for tick in (0.0, 0.5, 0.9, 1.0):
            _, y = xy(left, 1, tick)
            draw.line((left, y, left + panel_w, y), fill=(225, 225, 225))
            draw.text((left - 28, y - 6), f"{tick:.1f}", fill=(0, 0, 0))
        for b, backbone in enumerate(backbones):
            entry = results[domain]["backbones"][backbone]
            colour = COLOURS[b % len(COLOURS)]
            curve = entry["curve"]
            points = [xy(left, f, r) for f, r in zip(curve["false_removal"], curve["recall"], strict=True)]
            draw.line(points, fill=colour, width=2)
            test = entry["test"]
            x, y = xy(left, test["removed_share"], test["recall"])
            draw.ellipse((x - 4, y - 4, x + 4, y + 4), outline=colour, width=2)
    for b, backbone in enumerate(backbones):
        draw.text((pad, pad + panel_h + 26 + 16 * b), f"{backbone} (circle: test sample after dedup)",
                  fill=COLOURS[b % len(COLOURS)])
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


# ------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", action="append", default=None,
                        help="an embed.backbone string (repeatable; default pixels:32)")
    parser.add_argument("--domains", default="fashion-mnist,digits,photos")
    parser.add_argument("--pool-size", type=int, default=3000, help="Fashion-MNIST pool images")
    parser.add_argument("--calibration", type=int, default=500, help="calibration sample (at most a third of a pool)")
    parser.add_argument("--test", type=int, default=500, help="test sample (at most a third of a pool)")
    parser.add_argument("--tile", type=int, default=48, help="photo tile side in px")
    parser.add_argument("--target-precision", type=float, default=0.99)
    parser.add_argument("--also-threshold", type=float, action="append", default=None,
                        help="also report the test outcome at this fixed threshold (default: the demo's 0.96)")
    parser.add_argument("--image-size", type=int, default=224, help="input size of a ViT backbone")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO_ROOT / "benchmarks" / "results" / "copy_detection.json"))
    args = parser.parse_args(argv)
    backbones = args.backbone or ["pixels:32"]
    args.also_threshold = args.also_threshold if args.also_threshold is not None else [0.96]
    edits = CopyEditConfig()
    builders: dict[str, Callable[[], Domain]] = {"fashion-mnist": lambda: fashion_domain(args.pool_size, args.seed),
                                                 "digits": digits_domain, "photos": lambda: photo_tiles(args.tile)}
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for name in args.domains.split(","):
        domain = builders[name]()
        results[name] = {"description": domain.description, "pool": len(domain.images), "backbones": {}}
        for backbone in backbones:
            entry = measure(domain, backbone, args, edits)
            results[name]["backbones"][backbone] = entry
            test = entry["test"]
            print(f"{name:14s} {backbone:12s} t={entry['threshold']:.4f} recall={test['recall']:.3f} "
                  f"removed={test['removed_share']:.4f} ({test['removed']}) by edit {test['recall_by_edit']} "
                  f"[{entry['seconds']} s]", flush=True)
    out = Path(args.out)
    payload = {"benchmark": "copy_detection", "command": " ".join(["benchmarks/copy_detection.py", *sys.argv[1:]]),
               "targets": {"recall": 0.9, "removed_share": 0.01}, "target_precision": args.target_precision,
               "calibration_sample": args.calibration, "test_sample": args.test, "seed": args.seed,
               "edits": asdict(edits),
               "machine": {"platform": platform.platform(), "python": platform.python_version()},
               "seconds_total": round(time.perf_counter() - started, 1), "domains": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    draw_panels(results, backbones, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')} in {payload['seconds_total']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
