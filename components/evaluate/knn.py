"""Weighted k-NN classification on frozen features: the DINO / DINOv2 k-NN protocol.

Features are L2-normalised, so the dot product is the cosine similarity. Each query's neighbours vote
for their class with weight ``exp(sim / T)`` (T = 0.07); the class scores rank the predictions, giving
top-1 and top-5 accuracy. One top-k search with the largest k serves every k, because the k nearest
are the first k of the largest-k list. Memory is bounded: similarities exist only for one block of
``query_chunk`` queries x ``train_chunk`` references at a time, with a running top-k merged across
reference blocks, so a million reference features need only the features themselves plus one block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_TEMPERATURE = 0.07


def _as_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(array, np.ndarray) and not array.flags.writeable:
        array = array.copy()  # torch refuses to wrap read-only memory (a memory-mapped cache) silently
    tensor = torch.as_tensor(array)
    # float64 stays float64 so an exact reference comparison is possible; everything else is float32
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _labels(labels: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(labels, torch.Tensor):
        return labels.long()
    return torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: labels may be read-only


def top_k_neighbours(
    train: torch.Tensor, queries: torch.Tensor, k: int, train_chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarities (Q, k) and indices (Q, k) of the k most similar rows of ``train`` (N, D), best first,
    scanning ``train`` in blocks of ``train_chunk`` and merging a running top-k."""
    best_sims = queries.new_empty((len(queries), 0))
    best_idx = torch.empty((len(queries), 0), dtype=torch.long)
    for start in range(0, len(train), train_chunk):
        sims = queries @ train[start : start + train_chunk].T  # (Q, chunk)
        take = min(k, sims.shape[1])
        chunk_sims, chunk_idx = sims.topk(take, dim=1)  # (Q, take)
        merged_sims = torch.cat([best_sims, chunk_sims], dim=1)
        merged_idx = torch.cat([best_idx, chunk_idx + start], dim=1)
        keep = min(k, merged_sims.shape[1])
        best_sims, order = merged_sims.topk(keep, dim=1)  # sorted, best first
        best_idx = merged_idx.gather(1, order)
    return best_sims, best_idx


def class_votes(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, k: int, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores (Q, C): the first k neighbours each add exp(sim / T) to their class."""
    weights = (sims[:, :k] / temperature).exp()  # (Q, k)
    votes = sims.new_zeros((len(sims), num_classes))
    return votes.scatter_add_(1, neighbour_labels[:, :k], weights)


def ranked_classes(votes: torch.Tensor) -> torch.Tensor:
    """Classes by descending score (Q, C); a stable sort breaks ties toward the lower class index."""
    return torch.sort(votes, dim=1, descending=True, stable=True).indices


def knn_predict(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    query_chunk: int = 256,
    train_chunk: int = 65536,
) -> dict[int, torch.Tensor]:
    """Class scores (N_test, C) for each requested k (keys as requested; k is clipped to N_train)."""
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks!r}")
    train = F.normalize(_as_tensor(train_features), dim=1)  # (N, D)
    labels = _labels(train_labels)  # (N,)
    if len(labels) != len(train):
        raise ValueError(f"{len(train)} train features but {len(labels)} labels")
    classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    test = _as_tensor(test_features).to(train.dtype)
    effective = {k: min(k, len(train)) for k in ks}
    k_max = max(effective.values())
    scores: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test), query_chunk):
        queries = F.normalize(test[start : start + query_chunk], dim=1)  # (Q, D)
        sims, idx = top_k_neighbours(train, queries, k_max, train_chunk)
        neighbour_labels = labels[idx]  # (Q, k_max)
        for k in ks:
            scores[k].append(class_votes(sims, neighbour_labels, effective[k], classes, temperature))
    return {k: torch.cat(chunks) for k, chunks in scores.items()}


def knn_evaluate(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    test_labels: np.ndarray | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    query_chunk: int = 256,
    train_chunk: int = 65536,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) as ``{"knn_top1_k20": ..., "knn_top5_k20": ...}``, and
    each query's hit (bool, (N_test,)) under the same keys: the paired samples a comparison of two models
    on the same queries needs (components/evaluate/bootstrap.py)."""
    targets = _labels(test_labels)  # (N_test,)
    scores = knn_predict(train_features, train_labels, test_features, ks, temperature, num_classes,
                         query_chunk, train_chunk)
    per_query: dict[str, np.ndarray] = {}
    for k, votes in scores.items():
        ranked = ranked_classes(votes)  # (N_test, C)
        hits = ranked[:, :5] == targets[:, None]  # (N_test, min(5, C))
        per_query[f"knn_top1_k{k}"] = hits[:, 0].numpy().copy()
        per_query[f"knn_top5_k{k}"] = hits.any(dim=1).numpy().copy()
    metrics = {key: float(hit.mean()) for key, hit in per_query.items()}
    return metrics, per_query


def knn_classify(
    train_features: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_features: np.ndarray | torch.Tensor,
    test_labels: np.ndarray | torch.Tensor,
    ks: Sequence[int] = DEFAULT_KS,
    temperature: float = DEFAULT_TEMPERATURE,
    num_classes: int | None = None,
    query_chunk: int = 256,
    train_chunk: int = 65536,
) -> dict[str, float]:
    """Top-1 / top-5 accuracy (fractions in [0, 1]) as ``{"knn_top1_k20": ..., "knn_top5_k20": ...}``."""
    return knn_evaluate(train_features, train_labels, test_features, test_labels, ks, temperature, num_classes,
                        query_chunk, train_chunk)[0]
