"""Image retrieval on frozen CLS features: mean average precision and recall@k, plus a picture.

Ranking: each query ranks the gallery by cosine similarity, highest first; equal similarities are
ordered by gallery index (a stable sort), so results never depend on the sort implementation.
AP of a query = mean over its relevant items of precision at their rank. Recall@k = fraction of
queries with at least one relevant item in the first k (the hit-rate convention of image retrieval
benchmarks, not the fraction of relevant items found). Queries with no relevant item have no AP;
they are left out of both metrics and counted.

The demo protocol is semantic retrieval on Fashion-MNIST: test images query a gallery of train
images, relevant = same class (docs/evaluation-protocols.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from components.data import fashion_mnist
from components.evaluate.dense_data import save_png_atomic
from components.evaluate.features import (
    array_fingerprint,
    cached_features,
    extract_features,
    fashion_mnist_tensor,
    model_fingerprint,
)
from components.models.vit import DinoVisionTransformer

PICTURE_NAME = "retrieval.png"
RELEVANT_COLOUR = (0, 170, 0)
IRRELEVANT_COLOUR = (210, 0, 0)
QUERY_COLOUR = (40, 90, 220)


@dataclass
class RetrievalConfig:
    """Fashion-MNIST semantic retrieval: balanced query (test) and gallery (train) subsets."""

    enabled: bool = True
    image_size: int = 28  # images are resized to this before the backbone
    queries_per_class: int = 20
    gallery_per_class: int = 100
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    seed: int = 0
    source_dir: str = str(fashion_mnist.INSTALLED_DATA_DIR)
    data_cache_dir: str = ".dinoflow/cache/fashion-mnist"  # where a fetched copy goes (the stage passes <state>)
    allow_fetch: bool = True
    picture_queries: int = 4  # rows of the picture (0: no picture)
    picture_top_k: int = 8

    def validate(self) -> None:
        if self.image_size < 1 or self.queries_per_class < 1 or self.gallery_per_class < 1:
            raise ValueError("image_size, queries_per_class and gallery_per_class must be >= 1")
        if not self.ks or min(self.ks) < 1:
            raise ValueError("ks must be a non-empty list of positive integers")
        if self.picture_queries < 0 or self.picture_top_k < 1:
            raise ValueError("picture_queries must be >= 0 and picture_top_k >= 1")


# ---------------------------------------------------------------- metric math


def ranking(similarities: np.ndarray) -> np.ndarray:
    """Gallery indices by descending similarity, ties by ascending index: (G,) -> (G,) or (Q, G) -> (Q, G)."""
    sims = np.asarray(similarities, dtype=np.float64)
    if np.isnan(sims).any():
        raise ValueError("similarities contain NaN")
    return np.argsort(-sims, axis=-1, kind="stable")  # stable: equal keys keep index order


def _sorted_relevance(similarities: np.ndarray, relevance: np.ndarray) -> np.ndarray:
    sims, rel = np.atleast_2d(similarities), np.atleast_2d(np.asarray(relevance, dtype=bool))
    if sims.shape != rel.shape:
        raise ValueError(f"similarities {sims.shape} and relevance {rel.shape} differ")
    return np.take_along_axis(rel, ranking(sims), axis=1)  # (Q, G) relevance in rank order


def _average_precisions(rel_sorted: np.ndarray) -> np.ndarray:
    """AP per row of rank-ordered relevance (Q, G); rows without a relevant item give NaN."""
    hits = np.cumsum(rel_sorted, axis=1)  # (Q, G) relevant items up to each rank
    ranks = np.arange(1, rel_sorted.shape[1] + 1)  # (G,)
    precision_sum = (hits / ranks * rel_sorted).sum(axis=1)  # (Q,)
    n_relevant = rel_sorted.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_relevant > 0, precision_sum / n_relevant, np.nan)


def average_precision(similarities: np.ndarray, relevant: np.ndarray) -> float:
    """AP of one query: similarities (G,) to the gallery, relevant (G,) bool. Raises if nothing is relevant."""
    if np.asarray(similarities).ndim != 1:
        raise ValueError("average_precision takes one query: 1-D similarities")
    value = float(_average_precisions(_sorted_relevance(similarities, relevant))[0])
    if np.isnan(value):
        raise ValueError("the query has no relevant item: its AP is undefined")
    return value


def queries_without_relevant(relevance: np.ndarray) -> int:
    return int((~np.asarray(relevance, dtype=bool).any(axis=1)).sum())


def mean_average_precision(similarities: np.ndarray, relevance: np.ndarray) -> float:
    """mAP over the queries that have a relevant item: similarities and relevance (Q, G)."""
    aps = _average_precisions(_sorted_relevance(similarities, relevance))
    if np.isnan(aps).all():
        raise ValueError("no query has a relevant item")
    return float(np.nanmean(aps))


def recall_at_k(similarities: np.ndarray, relevance: np.ndarray, ks: Sequence[int]) -> dict[int, float]:
    """Fraction of queries (with a relevant item) that find one in their first k results, per k."""
    rel_sorted = _sorted_relevance(similarities, relevance)  # (Q, G)
    counted = rel_sorted.any(axis=1)
    if not counted.any():
        raise ValueError("no query has a relevant item")
    first_hit = np.argmax(rel_sorted[counted], axis=1)  # (Q',) 0-based rank of the first relevant item
    return {int(k): float((first_hit < k).mean()) for k in ks}


# ---------------------------------------------------------------- demo protocol


@dataclass(frozen=True)
class RetrievalData:
    query_images: np.ndarray  # (Q, 28, 28) uint8
    query_labels: np.ndarray  # (Q,)
    gallery_images: np.ndarray  # (G, 28, 28) uint8
    gallery_labels: np.ndarray  # (G,)


def load_retrieval_data(cfg: RetrievalConfig) -> RetrievalData:
    folder = fashion_mnist.locate(Path(cfg.source_dir), Path(cfg.data_cache_dir), allow_fetch=cfg.allow_fetch)
    test, train = fashion_mnist.load_split(folder, "test"), fashion_mnist.load_split(folder, "train")
    query_idx = fashion_mnist.balanced_subset(test.labels, cfg.queries_per_class, cfg.seed)
    gallery_idx = fashion_mnist.balanced_subset(train.labels, cfg.gallery_per_class, cfg.seed)
    return RetrievalData(test.images[query_idx], test.labels[query_idx].astype(np.int64),
                         train.images[gallery_idx], train.labels[gallery_idx].astype(np.int64))


def cls_features(
    model: torch.nn.Module, images: torch.Tensor, batch_size: int, cache_dir: Path | None, protocol: str
) -> np.ndarray:
    """Last-block CLS (N, D) of normalised images (N, 3, S, S), cached by (model, input bytes, protocol)."""

    def compute() -> np.ndarray:
        return extract_features(_as_vit(model), images, batch_size=batch_size).cls

    if cache_dir is None:
        return compute()
    key = {"protocol": protocol, "what": "cls", "model": model_fingerprint(model),
           "inputs": array_fingerprint(images.numpy())}
    return cached_features(cache_dir, key, compute)


def _as_vit(model: torch.nn.Module) -> DinoVisionTransformer:
    if not hasattr(model, "get_intermediate_layers"):
        raise TypeError(f"{type(model).__name__} has no get_intermediate_layers: not a DINOv2-style backbone")
    return model  # type: ignore[return-value]


def cosine_similarities(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """(Q, D), (G, D) -> (Q, G) cosine similarities in float32."""
    q = F.normalize(torch.from_numpy(np.array(queries, dtype=np.float32)), dim=1)
    g = F.normalize(torch.from_numpy(np.array(gallery, dtype=np.float32)), dim=1)
    return (q @ g.T).numpy()  # (Q, G)


def evaluate_retrieval(
    model: torch.nn.Module,
    cfg: RetrievalConfig,
    mean: Sequence[float],
    std: Sequence[float],
    device: str = "cpu",
    batch_size: int = 256,
    cache_dir: Path | None = None,
    picture_dir: Path | None = None,
) -> dict[str, float]:
    """Fashion-MNIST retrieval: ``retrieval_map``, ``retrieval_recall_at_{k}``, ``retrieval_queries_excluded``.

    With ``picture_dir`` the top results of the first ``cfg.picture_queries`` queries are drawn to
    ``picture_dir / "retrieval.png"``."""
    cfg.validate()
    model = model.to(device)
    data = load_retrieval_data(cfg)
    queries = cls_features(model, fashion_mnist_tensor(data.query_images, cfg.image_size, mean, std),
                           batch_size, cache_dir, "retrieval-query")
    gallery = cls_features(model, fashion_mnist_tensor(data.gallery_images, cfg.image_size, mean, std),
                           batch_size, cache_dir, "retrieval-gallery")
    sims = cosine_similarities(queries, gallery)  # (Q, G)
    relevance = data.query_labels[:, None] == data.gallery_labels[None, :]  # (Q, G)
    metrics = {"retrieval_map": mean_average_precision(sims, relevance),
               "retrieval_queries_excluded": float(queries_without_relevant(relevance))}
    for k, value in recall_at_k(sims, relevance, cfg.ks).items():
        metrics[f"retrieval_recall_at_{k}"] = value
    if picture_dir is not None and cfg.picture_queries > 0:
        picks = _picture_queries(data.query_labels, cfg.picture_queries)
        draw_retrieval_picture(data.query_images[picks], data.gallery_images, sims[picks], relevance[picks],
                               cfg.picture_top_k, Path(picture_dir) / PICTURE_NAME)
    return metrics


def _picture_queries(labels: np.ndarray, n: int) -> np.ndarray:
    """The first query of each of the first n classes: different classes make a more telling picture."""
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    return np.array(firsts[:n], dtype=np.int64)


# ---------------------------------------------------------------- picture


def _tile(image: np.ndarray, colour: tuple[int, int, int], tile: int, border: int) -> Image.Image:
    picture = Image.fromarray(image).convert("RGB").resize((tile - 2 * border, tile - 2 * border),
                                                           Image.Resampling.NEAREST)
    return ImageOps.expand(picture, border=border, fill=colour)


def draw_retrieval_picture(
    query_images: np.ndarray, gallery_images: np.ndarray, similarities: np.ndarray, relevance: np.ndarray,
    top_k: int, path: Path, tile: int = 64, border: int = 4,
) -> Path:
    """One row per query: the query (blue border), then its top-k gallery images, green if relevant, else red."""
    order = ranking(similarities)[:, :top_k]  # (Q, k)
    k = order.shape[1]
    gap = tile // 4
    canvas = Image.new("RGB", ((k + 1) * tile + gap, len(query_images) * tile), (255, 255, 255))
    for row, (query, ranked) in enumerate(zip(query_images, order, strict=True)):
        canvas.paste(_tile(query, QUERY_COLOUR, tile, border), (0, row * tile))
        for col, index in enumerate(ranked):
            colour = RELEVANT_COLOUR if relevance[row, index] else IRRELEVANT_COLOUR
            canvas.paste(_tile(gallery_images[index], colour, tile, border), (tile + gap + col * tile, row * tile))
    return save_png_atomic(canvas, path)
