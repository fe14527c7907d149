"""Copy detection on frozen CLS features: micro average precision (µAP), as DISC21 scores it.

Every query (an edited copy of a reference image, or a distractor that has no source in the reference
set) proposes its ``candidates`` most similar references with their cosine scores. All (query,
reference, score) predictions of all queries are pooled and sorted by score, highest first (ties keep
the order they were given: queries in order, each query's candidates best first). Then

    µAP = sum over positive predictions i of precision@i / n_positives

with n_positives the number of copy queries (each has exactly one true source). A source that is
not among its query's candidates is never recalled and caps µAP below 1; distractor queries can
only add false positives above the true matches. This is the area under the pooled precision-recall
curve that the DISC21 evaluation and the DINOv2 paper (Sec. 7, copy detection) report.

Demo data: square crops of the photos bundled with scikit-image; the queries are seeded PIL edits
(crop, rotate, JPEG, colour jitter, text overlay, blur) of some references, plus unedited crops of
other photos as distractors (docs/evaluation-protocols.md).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

from components.data.photos import BUNDLED_PHOTOS, load_photo
from components.evaluate.dense_data import rgb_tensor
from components.evaluate.retrieval import cls_features, cosine_similarities, ranking

EDITS = ("crop", "rotate", "jpeg", "colour", "text", "blur")


@dataclass
class CopyDetectConfig:
    """Edited copies of scikit-image photo crops among distractors."""

    enabled: bool = True
    image_size: int = 28  # what the backbone sees
    pool_size: int = 64  # edits are applied at this size, before the resize to image_size
    reference_photos: int = 12  # the first n bundled photos give references, the rest distractor queries
    crops_per_side: int = 2  # each photo gives crops_per_side^2 square crops
    edits: list[str] = field(default_factory=lambda: list(EDITS))
    copies_per_edit: int = 8  # copy queries per edit type
    candidates: int = 10  # predictions per query (top references)
    seed: int = 0

    def validate(self) -> None:
        if self.image_size < 1 or self.pool_size < 8 or self.crops_per_side < 1:
            raise ValueError("image_size >= 1, pool_size >= 8 and crops_per_side >= 1 are required")
        if not 1 <= self.reference_photos < len(BUNDLED_PHOTOS):
            raise ValueError(f"reference_photos must be in [1, {len(BUNDLED_PHOTOS) - 1}]: "
                             "the remaining photos are the distractors")
        unknown = sorted(set(self.edits) - set(EDITS))
        if not self.edits or unknown:
            raise ValueError(f"edits must be a non-empty subset of {EDITS}, unknown: {unknown}")
        if self.copies_per_edit < 1 or self.candidates < 1:
            raise ValueError("copies_per_edit and candidates must be >= 1")


# ---------------------------------------------------------------- metric math


def micro_average_precision(scores: np.ndarray, is_positive: np.ndarray, n_positives: int) -> float:
    """µAP of pooled predictions: scores (P,), is_positive (P,) bool, n_positives = ground-truth pairs.

    Sorted by score descending, ties in the given order. Positives beyond ``n_positives`` are an error
    (each ground-truth pair may be predicted once)."""
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(is_positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and is_positive {positive.shape} must be equal 1-D shapes")
    if n_positives < 1:
        raise ValueError("n_positives must be >= 1")
    if positive.sum() > n_positives:
        raise ValueError(f"{int(positive.sum())} positive predictions but only {n_positives} ground-truth pairs")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-scores, kind="stable")
    hits = positive[order]  # (P,) in rank order
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)  # (P,)
    return float((precision * hits).sum() / n_positives)


@dataclass(frozen=True)
class Predictions:
    """Pooled predictions: query index, reference index and score per row (P,)."""

    query: np.ndarray
    reference: np.ndarray
    score: np.ndarray


def top_candidates(similarities: np.ndarray, candidates: int) -> Predictions:
    """Each query's ``candidates`` best references (ties by reference index), pooled query by query."""
    order = ranking(similarities)[:, :candidates]  # (Q, c)
    queries = np.repeat(np.arange(len(similarities)), order.shape[1])
    references = order.reshape(-1)
    return Predictions(queries, references, similarities[queries, references].astype(np.float64))


# ---------------------------------------------------------------- edits


def _crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    side = image.width
    keep = round(side * float(rng.uniform(0.5, 0.8)))
    left, top = (int(rng.integers(side - keep + 1)) for _ in range(2))
    return image.crop((left, top, left + keep, top + keep)).resize((side, side), Image.Resampling.BICUBIC)


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    angle = float(rng.uniform(10, 30)) * (1 if rng.random() < 0.5 else -1)
    return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0))


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(5, 21)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _colour(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        image = enhancer(image).enhance(float(rng.uniform(0.5, 1.5)))
    return image


def _text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    image = image.copy()
    draw = ImageDraw.Draw(image)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    for _ in range(3):  # three lines of random text in random colours
        text = "".join(letters[int(i)] for i in rng.integers(len(letters), size=6))
        xy = (int(rng.integers(image.width // 2)), int(rng.integers(image.height - 10)))
        draw.text(xy, text, fill=tuple(int(c) for c in rng.integers(256, size=3)))
    return image


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(1.0, 2.5)) * image.width / 64))


EDIT_FUNCTIONS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "crop": _crop, "rotate": _rotate, "jpeg": _jpeg, "colour": _colour, "text": _text, "blur": _blur,
}


def apply_edit(image: np.ndarray, edit: str, rng: np.random.Generator) -> np.ndarray:
    """One named edit of an RGB image (S, S, 3) uint8, same size out."""
    if edit not in EDIT_FUNCTIONS:
        raise ValueError(f"unknown edit {edit!r}; expected one of {EDITS}")
    edited = EDIT_FUNCTIONS[edit](Image.fromarray(image).convert("RGB"), rng)
    return np.asarray(edited.convert("RGB"))


# ---------------------------------------------------------------- demo data


def photo_crops(name: str, size: int, per_side: int) -> np.ndarray:
    """The photo's centred square split into per_side x per_side crops, each resized: (per_side^2, S, S, 3)."""
    photo = load_photo(name)
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    side = min(photo.shape[:2]) // per_side * per_side
    top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    step = side // per_side
    crops = []
    for r in range(per_side):
        for c in range(per_side):
            crop = photo[top + r * step : top + (r + 1) * step, left + c * step : left + (c + 1) * step]
            crops.append(np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC)))
    return np.stack(crops)


@dataclass(frozen=True)
class CopyDetectData:
    references: np.ndarray  # (R, S, S, 3) uint8
    queries: np.ndarray  # (Q, S, S, 3) uint8
    source: np.ndarray  # (Q,) reference index of each copy query, -1 for distractors
    edit: list[str]  # (Q,) edit name, "none" for distractors


def build_copydetect_data(cfg: CopyDetectConfig) -> CopyDetectData:
    """References from the first ``reference_photos`` photos; copies of seeded references; distractors
    = every crop of the remaining photos, unedited."""
    rng = np.random.default_rng(cfg.seed)
    crops = [photo_crops(name, cfg.pool_size, cfg.crops_per_side) for name in BUNDLED_PHOTOS]
    references = np.concatenate(crops[: cfg.reference_photos])
    distractors = np.concatenate(crops[cfg.reference_photos :])
    queries, sources, edits = [], [], []
    for edit in cfg.edits:
        picks = rng.choice(len(references), size=min(cfg.copies_per_edit, len(references)), replace=False)
        for index in picks:
            queries.append(apply_edit(references[index], edit, rng))
            sources.append(int(index))
            edits.append(edit)
    queries.extend(distractors)
    sources.extend([-1] * len(distractors))
    edits.extend(["none"] * len(distractors))
    return CopyDetectData(references, np.stack(queries), np.array(sources, dtype=np.int64), edits)


# ---------------------------------------------------------------- protocol


def copydetect_metrics(similarities: np.ndarray, source: np.ndarray, edit: Sequence[str],
                       candidates: int) -> dict[str, float]:
    """``copydetect_muap``, ``copydetect_recall_at_1`` and ``copydetect_recall_at_1_{edit}`` from the
    (Q, R) query-reference similarities and each query's source (-1: distractor)."""
    predictions = top_candidates(similarities, candidates)
    is_positive = source[predictions.query] == predictions.reference  # distractors (-1) never match
    is_copy = source >= 0
    metrics = {"copydetect_muap": micro_average_precision(predictions.score, is_positive, int(is_copy.sum()))}
    top1 = ranking(similarities)[:, 0]  # (Q,)
    found = top1 == source  # (Q,)
    metrics["copydetect_recall_at_1"] = float(found[is_copy].mean())
    edits = np.array(edit)
    for name in sorted(set(edits[is_copy])):
        metrics[f"copydetect_recall_at_1_{name}"] = float(found[is_copy & (edits == name)].mean())
    return metrics


def evaluate_copydetect(
    model: torch.nn.Module,
    cfg: CopyDetectConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: str = "cpu",
    batch_size: int = 256,
    cache_dir: Path | None = None,
) -> dict[str, float]:
    """µAP and recall@1 (overall and per edit) of the demo copy-detection set."""
    cfg.validate()
    model = model.to(device)
    data = build_copydetect_data(cfg)
    references = cls_features(model, rgb_tensor(data.references, cfg.image_size, mean, std), batch_size,
                              cache_dir, "copydetect-reference")
    queries = cls_features(model, rgb_tensor(data.queries, cfg.image_size, mean, std), batch_size,
                           cache_dir, "copydetect-query")
    return copydetect_metrics(cosine_similarities(queries, references), data.source, data.edit, cfg.candidates)
