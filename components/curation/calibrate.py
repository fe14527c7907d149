"""Near-duplicate thresholds calibrated on the pool itself, with planted copies of its own images.

A dedup threshold is only meaningful for one descriptor on one kind of image: the same cosine 0.96
that catches every JPEG re-encode of a photo merges dozens of different handwritten "1"s. So before
any image is removed, this step measures on the pool what a threshold would do:

1. **Sample** ``sample_size`` embedded pool images (seeded, without replacement).
2. **Plant** ``copies_per_image`` copies of each with the copy-edit family (copy_edits.py) and describe
   them with the configured embedder, exactly as the embed step would (``describe_images``).
3. **Score.** A *copy score* is the cosine between a sampled image's pool vector and one of its
   copies. A *distinct score* is the cosine between a sampled image and its nearest **other** pool
   image (an exact search over all pool shards; the planted copies are not in the pool, so they
   cannot be that neighbour). Real duplicates already in the pool therefore count as distinct: the
   false-removal rate is an upper estimate and the chosen threshold errs on the side of removing less.

At a threshold ``t`` (dedup joins two images when cosine > t, strictly):

* ``recall(t)`` = share of planted copies with copy score > t;
* ``false_removal(t)`` = share of sampled images with distinct score > t: images that would be joined
  to a *different* image and, in a component of distinct images, all but one of them removed (for a
  pair, one of the two: the number counts the images at risk, an upper bound of those lost);
* ``precision(t)`` = recall / (recall + false_removal): the precision on a **balanced** set of one
  planted copy (recall averaged over an image's copies) and one hardest distinct neighbour per
  sampled image. It is undefined (NaN) where neither is above ``t``. A pool in which copies are rarer
  than that has a lower precision at the same threshold; ``false_removal`` is the number that says
  how much data a threshold loses, whatever the share of copies.

The **near-dedup threshold** is the lowest ``t`` (among the measured scores) with ``recall(t) > 0`` and
``precision(t) >= target_precision``: the highest recall that meets the target. When no threshold
meets it, the threshold is the highest distinct score (no sampled distinct image is removed) and
``reached`` is False. The **eval-dedup threshold** is picked from the same curve with
``eval_target_precision``: relative dedup joins a pool image to an evaluation image, and a copy of an
evaluation image planted in a crawl goes through the same edits, while a pool image that merely
resembles one is what a sampled image's nearest distinct neighbour stands for. With equal targets
the two thresholds are equal; a lower ``eval_target_precision`` trades lost training images for
fewer leaks (a leak costs more).

The scores are the step's stored output (``scores.parquet``); the curve and the chosen thresholds
are recomputed from them, so changing a target never re-describes anything.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from components.curation.copy_edits import EDIT_NAMES, CopyEditConfig, copy_rng, random_copy
from components.curation.embed import EmbedConfig, describe_images, load_embedder
from components.curation.knn_graph import InMemoryVectors, KnnConfig, VectorSource, build_index, search_edges
from components.storage import read_uri
from components.storage.atomic import write_parquet_atomic, write_text_atomic

SCORES_FILE = "scores.parquet"
META_FILE = "calibration.json"
SEARCH_BATCH = 8_192  # sampled images per index search: bounds the (batch, k) result arrays


@dataclass
class CalibrateConfig:
    """The ``calibrate`` section of the curate params (see the module docstring)."""

    enabled: bool = False  # measure on this pool before dedup (``dinoflow curate --calibrate``)
    apply: bool = False  # use the calibrated thresholds for near_dedup / eval_dedup in this run (else: report only)
    sample_size: int = 1000  # pool images sampled (all of them when the pool is smaller)
    copies_per_image: int = 1  # planted copies per sampled image
    target_precision: float = 0.99  # near-dedup threshold: lowest t with balanced precision >= this
    eval_target_precision: float = 0.99  # eval-dedup threshold: the same rule with this target
    seed: int = 0
    edits: CopyEditConfig = field(default_factory=CopyEditConfig)

    def validate(self) -> None:
        if self.sample_size < 2 or self.copies_per_image < 1:
            raise ValueError("calibrate: sample_size must be >= 2 and copies_per_image >= 1")
        if not (0.5 < self.target_precision <= 1.0 and 0.5 < self.eval_target_precision <= 1.0):
            raise ValueError("calibrate: target_precision and eval_target_precision must be in (0.5, 1]")
        self.edits.validate()


@dataclass(frozen=True)
class CalibrationScores:
    """What was measured: one row per sampled image (the step's stored output)."""

    ids: list[str]  # (n,) sampled pool ids
    copy_scores: np.ndarray  # (n, m) cosine(sampled image, its copy j)
    copy_edits: list[list[str]]  # (n, m) the edits of each copy, "+"-joined ("crop+jpeg")
    distinct_scores: np.ndarray  # (n,) cosine(sampled image, its nearest other pool image)
    neighbour_ids: list[str]  # (n,) that nearest other pool image
    pool_rows: int  # embedded pool images searched

    def to_frame(self) -> pl.DataFrame:
        return pl.DataFrame({"id": self.ids, "neighbour_id": self.neighbour_ids,
                             "distinct_cosine": self.distinct_scores.astype(np.float64),
                             "copy_cosine": [list(map(float, row)) for row in self.copy_scores],
                             "copy_edits": self.copy_edits},
                            schema={"id": pl.Utf8, "neighbour_id": pl.Utf8, "distinct_cosine": pl.Float64,
                                    "copy_cosine": pl.List(pl.Float64), "copy_edits": pl.List(pl.Utf8)})

    def write(self, folder: Path) -> None:
        write_parquet_atomic(self.to_frame(), folder / SCORES_FILE)
        write_text_atomic(json.dumps({"pool_rows": self.pool_rows}) + "\n", folder / META_FILE)

    @classmethod
    def read(cls, folder: Path) -> CalibrationScores:
        frame = pl.read_parquet(folder / SCORES_FILE)
        meta = json.loads((folder / META_FILE).read_text())
        return cls(ids=frame["id"].to_list(), neighbour_ids=frame["neighbour_id"].to_list(),
                   distinct_scores=frame["distinct_cosine"].to_numpy().astype(np.float64),
                   copy_scores=np.asarray(frame["copy_cosine"].to_list(), dtype=np.float64).reshape(frame.height, -1),
                   copy_edits=frame["copy_edits"].to_list(), pool_rows=int(meta["pool_rows"]))


@dataclass(frozen=True)
class ThresholdCurve:
    """Recall, false-removal rate and balanced precision at each measured score (thresholds increasing)."""

    thresholds: np.ndarray  # (T,)
    recall: np.ndarray  # (T,) non-increasing
    false_removal: np.ndarray  # (T,) non-increasing
    precision: np.ndarray  # (T,) NaN where nothing is above the threshold


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    recall: float
    false_removal: float
    precision: float  # NaN when nothing is above the threshold

    def summary(self) -> dict[str, float | None]:
        return {"threshold": self.threshold, "recall": self.recall, "false_removal": self.false_removal,
                "precision": None if math.isnan(self.precision) else self.precision}


@dataclass(frozen=True)
class ThresholdChoice:
    point: OperatingPoint
    target_precision: float
    reached: bool  # False: no threshold met the target; the point removes no sampled distinct image instead

    def summary(self) -> dict[str, Any]:
        return {**self.point.summary(), "target_precision": self.target_precision, "reached": self.reached}


@dataclass(frozen=True)
class CalibrationResult:
    scores: CalibrationScores
    curve: ThresholdCurve
    near_dedup: ThresholdChoice
    eval_dedup: ThresholdChoice
    configured: dict[str, OperatingPoint]  # the hand-set thresholds ("near_dedup", "eval_dedup"), measured
    recall_by_edit: dict[str, float]  # at the near-dedup threshold: recall of the copies that went through each edit

    def summary(self) -> dict[str, Any]:
        """JSON-ready: counts, the chosen thresholds, the hand-set ones measured, recall per edit."""
        n, m = self.scores.copy_scores.shape
        return {"sampled": n, "copies_per_image": m, "pool_rows": self.scores.pool_rows,
                "near_dedup": self.near_dedup.summary(), "eval_dedup": self.eval_dedup.summary(),
                "configured": {name: point.summary() for name, point in self.configured.items()},
                "recall_by_edit": self.recall_by_edit}


# ------------------------------------------------------------------------------- from scores to thresholds


def operating_point(copy_scores: np.ndarray, distinct_scores: np.ndarray, threshold: float) -> OperatingPoint:
    """Recall, false-removal rate and balanced precision of ``cosine > threshold`` (module docstring)."""
    recall = float(np.mean(copy_scores > threshold)) if copy_scores.size else 0.0
    false_removal = float(np.mean(distinct_scores > threshold)) if distinct_scores.size else 0.0
    return OperatingPoint(threshold=float(threshold), recall=recall, false_removal=false_removal,
                          precision=balanced_precision(recall, false_removal))


def balanced_precision(recall: float, false_removal: float) -> float:
    total = recall + false_removal
    return recall / total if total > 0 else math.nan


def threshold_curve(copy_scores: np.ndarray, distinct_scores: np.ndarray) -> ThresholdCurve:
    """The curve at every measured score (each a candidate threshold) and at -1 (everything joined)."""
    positives = np.sort(np.asarray(copy_scores, dtype=np.float64).ravel())  # (P,)
    negatives = np.sort(np.asarray(distinct_scores, dtype=np.float64).ravel())  # (N,)
    thresholds = np.unique(np.concatenate([[-1.0], positives, negatives]))  # (T,) increasing
    recall = share_above(positives, thresholds)  # (T,)
    false_removal = share_above(negatives, thresholds)  # (T,)
    total = recall + false_removal
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(total > 0, recall / np.where(total > 0, total, 1.0), np.nan)  # (T,)
    return ThresholdCurve(thresholds=thresholds, recall=recall, false_removal=false_removal, precision=precision)


def share_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Share of ``sorted_scores`` strictly above each threshold (binary search; 0 for no scores)."""
    if not sorted_scores.size:
        return np.zeros_like(thresholds)
    above = sorted_scores.size - np.searchsorted(sorted_scores, thresholds, side="right")  # (T,) counts
    return above / sorted_scores.size


def choose_threshold(curve: ThresholdCurve, distinct_scores: np.ndarray, target_precision: float) -> ThresholdChoice:
    """The lowest threshold with recall > 0 and precision >= target; else the highest distinct score."""
    meets = (curve.recall > 0) & (np.nan_to_num(curve.precision, nan=0.0) >= target_precision)  # (T,)
    if meets.any():
        i = int(np.argmax(meets))  # the first (lowest) threshold that meets the target
        point = OperatingPoint(threshold=float(curve.thresholds[i]), recall=float(curve.recall[i]),
                               false_removal=float(curve.false_removal[i]), precision=float(curve.precision[i]))
        return ThresholdChoice(point=point, target_precision=target_precision, reached=True)
    fallback = float(np.max(distinct_scores)) if distinct_scores.size else 1.0
    i = int(np.searchsorted(curve.thresholds, fallback))
    point = OperatingPoint(threshold=fallback, recall=float(curve.recall[i]),
                           false_removal=float(curve.false_removal[i]), precision=float(curve.precision[i]))
    return ThresholdChoice(point=point, target_precision=target_precision, reached=False)


def recall_by_edit(scores: CalibrationScores, threshold: float) -> dict[str, float]:
    """Per edit: the share of copies that went through it (among others) still above ``threshold``."""
    flat_scores = scores.copy_scores.ravel()  # (n*m,)
    flat_edits = [set(names.split("+")) for row in scores.copy_edits for names in row]  # (n*m,)
    out: dict[str, float] = {}
    for edit in EDIT_NAMES:
        mask = np.array([edit in names for names in flat_edits], dtype=bool)  # (n*m,)
        if mask.any():
            out[edit] = float(np.mean(flat_scores[mask] > threshold))
    return out


def calibrate_from_scores(scores: CalibrationScores, cfg: CalibrateConfig,
                          configured: dict[str, float]) -> CalibrationResult:
    """The curve, both chosen thresholds and the hand-set ones (``configured``: name -> threshold) measured."""
    curve = threshold_curve(scores.copy_scores, scores.distinct_scores)
    near = choose_threshold(curve, scores.distinct_scores, cfg.target_precision)
    evals = choose_threshold(curve, scores.distinct_scores, cfg.eval_target_precision)
    measured = {name: operating_point(scores.copy_scores, scores.distinct_scores, t) for name, t in configured.items()}
    return CalibrationResult(scores=scores, curve=curve, near_dedup=near, eval_dedup=evals, configured=measured,
                             recall_by_edit=recall_by_edit(scores, near.point.threshold))


# ------------------------------------------------------------------------------- measuring on a pool


def sample_rows(n_rows: int, size: int, seed: int) -> np.ndarray:
    """``min(size, n_rows)`` distinct row numbers, sorted (seeded; the same pool and seed give the same sample)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=min(size, n_rows), replace=False))


def gather_rows(pool: VectorSource, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The ids and vectors (n, D) of global row numbers ``rows`` (sorted), streamed shard by shard."""
    ids: list[str] = []
    parts = [np.zeros((0, pool.dim), dtype=np.float32)]
    start = 0
    for shard_ids, vectors in pool.iter_shards():
        local = rows[(rows >= start) & (rows < start + len(shard_ids))] - start  # (k,)
        ids.extend(shard_ids[int(i)] for i in local)
        parts.append(np.asarray(vectors[local], dtype=np.float32))  # (k, D)
        start += len(shard_ids)
    return ids, np.concatenate(parts)  # (n, D)


def nearest_other(pool: VectorSource, queries: np.ndarray, query_rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Each query's highest cosine to a pool row other than its own (``query_rows``) and that row's id.

    Exact (the k-NN graph's flat index): the two nearest rows are searched and the query's own row,
    wherever it ranks, is dropped by row number (an identical vector may tie with it)."""
    index = build_index(pool, KnnConfig(index="flat", k=2)).index
    edges = search_edges(index, InMemoryVectors([str(i) for i in range(len(queries))], queries), k=2,
                         threshold=-math.inf, exclude_self=False, query_batch=SEARCH_BATCH)
    other = edges.dst != query_rows[edges.src]  # (E,)
    src, dst, cosine = edges.src[other], edges.dst[other], edges.cosine[other]
    best = np.full(len(queries), -np.inf, dtype=np.float64)  # (n,)
    np.maximum.at(best, src, cosine.astype(np.float64))
    winner = np.full(len(queries), -1, dtype=np.int64)  # (n,) pool row of each query's best other row
    is_best = cosine.astype(np.float64) == best[src]
    winner[src[is_best]] = dst[is_best]
    ids = pool.ids()
    return best, [ids[int(row)] if row >= 0 else "" for row in winner]


def plant_copies(images: Sequence[Image.Image], copies: int, seed: int, indices: Sequence[int],
                 edits: CopyEditConfig) -> tuple[list[Image.Image], list[list[str]]]:
    """``copies`` planted copies of each image (flat, image-major) and their edits (per image, per copy).

    ``indices[i]`` seeds image i's copies, so a copy does not depend on which other images were sampled."""
    planted: list[Image.Image] = []
    names: list[list[str]] = []
    for image, index in zip(images, indices, strict=True):
        row = []
        for j in range(copies):
            copy, applied = random_copy(image, copy_rng(seed, int(index), j), edits)
            planted.append(copy)
            row.append("+".join(applied))
        names.append(row)
    return planted, names


def read_image(uri: str, read: Callable[[str], bytes]) -> Image.Image:
    with Image.open(io.BytesIO(read(uri))) as image:
        image.load()
        return image.copy()


def measure_pool(rows: pl.DataFrame, pool: VectorSource, embed: EmbedConfig, cfg: CalibrateConfig,
                 read: Callable[[str], bytes] = read_uri) -> CalibrationScores:
    """Sample, plant, describe and score (module docstring). ``rows`` maps pool ids to ``uri``s."""
    cfg.validate()
    if pool.num_rows < 2:
        raise ValueError(f"calibration needs at least 2 embedded pool images, the pool has {pool.num_rows}")
    sampled_rows = sample_rows(pool.num_rows, cfg.sample_size, cfg.seed)  # (n,)
    ids, originals = gather_rows(pool, sampled_rows)  # (n,), (n, D)
    uri_of = dict(zip(rows["id"].to_list(), rows["uri"].to_list(), strict=True))
    images = [read_image(uri_of[i], read) for i in ids]  # it was decoded for the embedding moments ago
    planted, edits = plant_copies(images, cfg.copies_per_image, cfg.seed, [int(r) for r in sampled_rows], cfg.edits)
    copies = describe_images(planted, embed, load_embedder(embed))  # (n*m, D)
    copy_scores = np.einsum("nmd,nd->nm", copies.reshape(len(ids), cfg.copies_per_image, -1), originals)  # (n, m)
    distinct, neighbours = nearest_other(pool, originals, sampled_rows)
    return CalibrationScores(ids=ids, copy_scores=copy_scores.astype(np.float64), copy_edits=edits,
                             distinct_scores=distinct, neighbour_ids=neighbours, pool_rows=pool.num_rows)


__all__ = ["CalibrateConfig", "CalibrationResult", "CalibrationScores", "OperatingPoint", "ThresholdChoice",
           "ThresholdCurve", "calibrate_from_scores", "choose_threshold", "measure_pool", "nearest_other",
           "operating_point", "plant_copies", "threshold_curve"]
