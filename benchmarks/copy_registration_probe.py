"""Does geometric verification recover the copies a pixel descriptor misses? A measurement, not a library step.

    .venv/bin/python benchmarks/copy_registration_probe.py --out benchmarks/results/copy_registration_probe.json

Classical copy detection retrieves candidates with a cheap descriptor, then verifies each candidate
pair by registering one image onto the other. This probe measures how far that idea goes on the
planted domains of benchmarks/copy_detection.py (same pools, same samples, same copies, same edits),
before any of it is built into the curate stage:

1. **candidates**: the ``pixels:16`` descriptor's nearest pool rows (the k-NN graph's own search);
   the JSON records how often a copy's original is among its ``--candidates`` and top-64 neighbours;
2. **registration** of each pair (both directions: either image may be the cropped one): an affine warp
   ``grid_sample``-ed from one grey 32x32 image onto the other (scale 0.72-1 per axis, a shift that keeps
   the window inside, rotation up to 7 degrees, flip), first an exhaustive grid of 98 crop windows x 2
   flips scored on blurred images (sigma 1.5 px), then the best two refined by Adam on the normalised
   cross-correlation (sigma 0.7 px, 25 steps). Before registering, both images of a pair are brought down
   to the smaller one's resolution (a copy rescaled to 14 px has no detail the 28 px original could match);
3. **scores** of the registered pair: ``global`` = normalised cross-correlation over the overlap;
   ``local`` = the variance-weighted mean of 8x8-window correlations after dropping the worst 20% of the
   weight (an overlaid caption spoils a few windows, not all); ``mix`` = their mean.

For each calibration-sample image: its copy's score, and the highest score over its ``--candidates``
nearest *other* pool images (the distinct score). Recall at a false-removal rate f: share of copies
scoring above the (1 - f) quantile of the distinct scores, the calibration curve's reading (docs/curation.md).
Recall is measured on the true pair, so it is the verification's recall *given* that candidate search
found the original; multiply by the candidate recall for the two stages together.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from copy_detection import copies_of, digits_domain, fashion_domain, photo_tiles, split_samples  # noqa: E402

from components.curation.copy_edits import EDIT_NAMES, CopyEditConfig  # noqa: E402
from components.curation.descriptor import PixelDescriptor  # noqa: E402

SIZE = 32  # px of the registration grid
MIN_SCALE, MAX_ROTATION = 0.72, 0.12  # the warp's limits: crops up to 28% of a side, ~7 degrees
CHUNK = 200  # pairs registered at once (memory: CHUNK x 98 windows x 2 flips grids)
FALSE_RATES = (0.005, 0.01, 0.02)


def grey_pair(a: Image.Image, b: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Both images as SIZE x SIZE grey float32, each first brought down to the pair's smaller resolution."""
    side = min(min(a.size), min(b.size), SIZE)

    def prepare(image: Image.Image) -> np.ndarray:
        grey = image.convert("L")
        if side < min(grey.size):
            grey = grey.resize((side, side), Image.Resampling.BILINEAR)  # antialiased on the way down
        return np.asarray(grey.resize((SIZE, SIZE), Image.Resampling.BILINEAR), dtype=np.float32)

    return prepare(a), prepare(b)


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) images, borders replicated."""
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    x = F.pad(images[:, None], (radius, radius, 0, 0), mode="replicate")
    x = F.conv2d(x, taps.view(1, 1, 1, -1))
    x = F.pad(x, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(x, taps.view(1, 1, -1, 1))[:, 0]  # (B, H, W)


def affine(params: torch.Tensor) -> torch.Tensor:
    """(B, 6) = scale x, scale y, shift x, shift y, rotation (rad), flip (+-1) -> (B, 2, 3) sampling matrices."""
    sx, sy, tx, ty, rot, flip = params.unbind(-1)
    cos, sin = torch.cos(rot), torch.sin(rot)
    return torch.stack([torch.stack([cos * sx * flip, -sin * sy, tx], -1),
                        torch.stack([sin * sx * flip, cos * sy, ty], -1)], 1)


def warp(source: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``source`` (B, H, W) sampled through the warps: (warped images, mask of the pixels inside the source)."""
    b, h, w = source.shape
    grid = F.affine_grid(affine(params), [b, 1, h, w], align_corners=False)  # (B, H, W, 2)
    warped = F.grid_sample(source[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped[:, 0], (grid.abs() <= 1.0).all(-1).float()


def masked_ncc(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Normalised cross-correlation of (B, H, W) images over ``mask``: (B,)."""
    count = mask.sum((1, 2)).clamp_min(1.0)

    def standardise(v: torch.Tensor) -> torch.Tensor:
        centred = (v - ((v * mask).sum((1, 2)) / count)[:, None, None]) * mask
        return centred / centred.pow(2).sum((1, 2)).sqrt().clamp_min(1e-6)[:, None, None]

    return (standardise(x) * standardise(y)).sum((1, 2))


def window_grid() -> torch.Tensor:
    """The exhaustive starting warps: crop windows of scale 1 / 0.9 / 0.8 per axis at both ends and the centre."""
    rows = []
    for flip in (1.0, -1.0):
        for sx in (1.0, 0.9, 0.8):
            for sy in (1.0, 0.9, 0.8):
                for tx in sorted({0.0, 1 - sx, sx - 1}):
                    for ty in sorted({0.0, 1 - sy, sy - 1}):
                        rows.append([sx, sy, tx, ty, 0.0, flip])
    return torch.tensor(rows)  # (98, 6)


def register(source: torch.Tensor, target: torch.Tensor, steps: int = 25,
             keep: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Best warp of ``source`` onto ``target`` (B, H, W) each: (fine-scale correlation (B,), warp (B, 6))."""
    grid = window_grid()
    n, g = source.shape[0], grid.shape[0]
    coarse_source, coarse_target = blur(source, 1.5), blur(target, 1.5)
    with torch.no_grad():
        warped, mask = warp(coarse_source.repeat_interleave(g, 0), grid.repeat(n, 1))
        coarse = masked_ncc(warped, coarse_target.repeat_interleave(g, 0), mask).view(n, g)  # (B, G)
    starts = grid[coarse.topk(keep, 1).indices].view(-1, 6)  # (B * keep, 6)
    fine_source, fine_target = (blur(v, 0.7).repeat_interleave(keep, 0) for v in (source, target))
    free = starts[:, :5].clone().requires_grad_(True)
    flips = starts[:, 5:]
    optimiser = torch.optim.Adam([free], lr=0.01)
    for _ in range(steps):
        warped, mask = warp(fine_source, torch.cat([free, flips], 1))
        loss = -masked_ncc(warped, fine_target, mask).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():  # stay within the edit family: a window inside the image, small rotations
            free[:, 0:2].clamp_(MIN_SCALE, 1.0)
            free[:, 4].clamp_(-MAX_ROTATION, MAX_ROTATION)
            limit = 1.0 - free[:, 0:2] + 0.02
            free[:, 2:4].copy_(torch.maximum(torch.minimum(free[:, 2:4], limit), -limit))
    with torch.no_grad():
        params = torch.cat([free, flips], 1)
        warped, mask = warp(fine_source, params)
        score = masked_ncc(warped, fine_target, mask).view(n, keep)
        best = score.argmax(1)
        return score.max(1).values, params.view(n, keep, 6)[torch.arange(n), best]


def local_correlation(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, window: int = 8, stride: int = 4,
                      drop: float = 0.2) -> torch.Tensor:
    """Variance-weighted mean of window correlations, the worst ``drop`` of the weight left out: (B,)."""
    xs, ys, ms = (F.unfold(v[:, None], window, stride=stride) for v in (x, y, mask))  # (B, w*w, L)
    inside = (ms.min(1).values > 0.5).float()  # (B, L): windows wholly inside the overlap
    xc, yc = xs - xs.mean(1, keepdim=True), ys - ys.mean(1, keepdim=True)
    vx, vy = xc.pow(2).sum(1), yc.pow(2).sum(1)
    corr = (xc * yc).sum(1) / (vx * vy).sqrt().clamp_min(1e-3)  # (B, L)
    weight = (vx * vy).pow(0.25) * inside
    ordered, order = torch.sort(torch.where(inside > 0, corr, torch.full_like(corr, 9.0)), 1)
    weights = torch.gather(weight, 1, order)
    share = weights.cumsum(1) / weights.sum(1, keepdim=True).clamp_min(1e-6)
    kept = weights * (share > drop).float() * (ordered < 8.0).float()
    return (ordered * kept).sum(1) / kept.sum(1).clamp_min(1e-6)


def pair_scores(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    """Register each pair both ways (either may be the crop), keep the better way, score it three ways."""
    out: dict[str, list[np.ndarray]] = {"global": [], "local": [], "mix": []}
    for start in range(0, len(a), CHUNK):
        x, y = torch.from_numpy(a[start:start + CHUNK]), torch.from_numpy(b[start:start + CHUNK])
        forward, params_f = register(x, y)
        backward, params_b = register(y, x)
        use_forward = forward >= backward
        source = torch.where(use_forward[:, None, None], x, y)
        target = torch.where(use_forward[:, None, None], y, x)
        params = torch.where(use_forward[:, None], params_f, params_b)
        with torch.no_grad():
            warped, mask = warp(blur(source, 0.5), params)
            sharp_target = blur(target, 0.5)
            global_score = masked_ncc(warped, sharp_target, mask)
            local_score = local_correlation(warped, sharp_target, mask)
        out["global"].append(global_score.numpy())
        out["local"].append(local_score.numpy())
        out["mix"].append(0.5 * (global_score + local_score).numpy())
    return {name: np.concatenate(parts).astype(np.float64) for name, parts in out.items()}


def recall_at(copies: np.ndarray, distinct: np.ndarray, rate: float) -> float:
    return float(np.mean(copies > np.quantile(distinct, 1.0 - rate)))


def measure(name: str, images: list[Image.Image], args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    rows, _ = split_samples(len(images), args.calibration, args.calibration, args.seed)
    copies, edits = copies_of(images, rows, args.seed, CopyEditConfig())
    descriptor = PixelDescriptor(16)
    pool = np.stack([descriptor.describe(image) for image in images])  # (N, 512)
    planted = np.stack([descriptor.describe(image) for image in copies])  # (n, 512)
    to_pool = planted @ pool.T  # (n, N)
    rank = (to_pool > to_pool[np.arange(len(rows)), rows][:, None]).sum(1)  # (n,) the original's rank
    pixel_copy = to_pool[np.arange(len(rows)), rows]
    others = pool[rows] @ pool.T
    others[np.arange(len(rows)), rows] = -np.inf
    neighbours = np.argsort(-others, 1)[:, :args.candidates]  # (n, C) nearest other pool images
    pixel_distinct = others.max(1)

    true_pairs = [grey_pair(images[int(r)], copy) for r, copy in zip(rows, copies, strict=True)]
    false_pairs = [grey_pair(images[int(r)], images[int(j)]) for r, js in zip(rows, neighbours, strict=True)
                   for j in js]
    copy_scores = pair_scores(np.stack([p[0] for p in true_pairs]), np.stack([p[1] for p in true_pairs]))
    false_scores = pair_scores(np.stack([p[0] for p in false_pairs]), np.stack([p[1] for p in false_pairs]))
    result: dict[str, Any] = {
        "pool": len(images), "sample": len(rows), "candidates": args.candidates,
        "candidate_recall": {f"top{args.candidates}": float(np.mean(rank < args.candidates)),
                             "top64": float(np.mean(rank < 64))},
        "pixels16": {f"recall_at_{rate}": recall_at(pixel_copy, pixel_distinct, rate) for rate in FALSE_RATES},
        "scores": {}}
    for score, values in copy_scores.items():
        distinct = false_scores[score].reshape(len(rows), args.candidates).max(1)
        threshold = float(np.quantile(distinct, 0.99))
        per_edit = {edit: round(float(np.mean(values[[edit in e.split("+") for e in edits]] > threshold)), 3)
                    for edit in EDIT_NAMES}
        result["scores"][score] = {
            **{f"recall_at_{rate}": round(recall_at(values, distinct, rate), 4) for rate in FALSE_RATES},
            "threshold_at_0.01": round(threshold, 5),
            "recall_by_edit_at_0.01 (copies that include the edit)": per_edit,
            "copy_quantiles_5_25_50": [round(float(v), 5) for v in np.quantile(values, [0.05, 0.25, 0.5])],
            "distinct_quantiles_50_90_99": [round(float(v), 5) for v in np.quantile(distinct, [0.5, 0.9, 0.99])]}
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(name, json.dumps(result), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", default="fashion-mnist,digits,photos")
    parser.add_argument("--calibration", type=int, default=500, help="sampled pool images (at most a third)")
    parser.add_argument("--candidates", type=int, default=5, help="nearest other pool images scored per sample")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks/results/copy_registration_probe.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    builders = {"fashion-mnist": lambda: fashion_domain(3000, args.seed).images,
                "digits": lambda: digits_domain().images, "photos": lambda: photo_tiles(48).images}
    started = time.perf_counter()
    results = {name: measure(name, builders[name](), args) for name in args.domains.split(",")}
    payload = {"benchmark": "copy_registration_probe", "command": " ".join(sys.argv[1:]),
               "targets": {"recall": 0.9, "false_removal": 0.01}, "seed": args.seed, "threads": args.threads,
               "machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "torch": torch.__version__},
               "seconds_total": round(time.perf_counter() - started, 1), "domains": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
