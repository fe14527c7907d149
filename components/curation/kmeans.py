"""Faiss k-means over embedding shards: train on a bounded, seeded sample, assign every row by streaming.

Training needs its points in memory, so it runs on all rows (``max_train_rows == 0``, small pools) or
on a seeded uniform sample of ``max_train_rows`` rows read shard by shard. Assignment then streams the
whole source one shard at a time, so only the centroids and the (N,) outputs stay resident.

Faiss silently subsamples to ``max_points_per_centroid`` (256 by default) points per centroid before
training; here that is always set explicitly (0 means "every training point"), so the sample size is
decided in one visible place. ``spherical`` k-means (unit vectors, centroids renormalised after each
update, assignment by inner product) is cosine k-means, the variant used on DINOv2 embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from components.curation.knn_graph import VectorSource, gpu_count


@dataclass
class KMeansConfig:
    n_clusters: int
    n_iter: int = 20
    seed: int = 0
    spherical: bool = True  # cosine k-means on unit vectors (centroids renormalised)
    max_points_per_centroid: int = 0  # 0: train on ALL training points (faiss would subsample to 256/centroid)
    max_train_rows: int = 0  # 0: all rows; else a seeded uniform sample of this many rows is used for training
    use_gpu: bool | None = None  # None: when faiss sees a GPU
    n_redo: int = 1  # independent seeded restarts, the lowest-objective one kept (guards against a bad random init)

    def validate(self) -> None:
        if self.n_clusters < 1 or self.n_iter < 1 or self.n_redo < 1:
            raise ValueError("n_clusters, n_iter and n_redo must be >= 1")
        if self.max_points_per_centroid < 0 or self.max_train_rows < 0:
            raise ValueError("max_points_per_centroid and max_train_rows must be >= 0 (0: no limit)")


def wants_gpu(use_gpu: bool | None) -> bool:
    return gpu_count() > 0 if use_gpu is None else use_gpu


def flat_index(dim: int, spherical: bool, use_gpu: bool | None) -> tuple[Any, tuple[Any, ...]]:
    """An exact index (inner product for spherical, L2 otherwise) and the GPU resources it needs alive."""
    index: Any = faiss.IndexFlatIP(dim) if spherical else faiss.IndexFlatL2(dim)
    if wants_gpu(use_gpu):  # not exercised here: no GPU on the development machines
        resources = faiss.StandardGpuResources()
        return faiss.index_cpu_to_gpu(resources, 0, index), (resources,)
    return index, ()


def sample_rows(source: VectorSource, max_rows: int, seed: int) -> np.ndarray:
    """A seeded uniform sample of rows (all when ``max_rows`` is 0 or >= N), in row order: (m, D) float32."""
    n = source.num_rows
    if max_rows == 0 or max_rows >= n:
        wanted = None
    else:
        wanted = np.sort(np.random.default_rng(seed).choice(n, size=max_rows, replace=False))  # (m,)
    parts, base = [], 0
    for _, vectors in source.iter_shards():
        rows = vectors.shape[0]
        if wanted is None:
            parts.append(np.asarray(vectors, dtype=np.float32))
        else:
            lo, hi = np.searchsorted(wanted, [base, base + rows])  # the sampled rows that fall in this shard
            parts.append(np.asarray(vectors[wanted[lo:hi] - base], dtype=np.float32))
        base += rows
    if not parts:
        return np.zeros((0, source.dim), np.float32)
    return np.ascontiguousarray(np.concatenate(parts))  # (m, D)


def kmeans_on_array(points: np.ndarray, n_clusters: int, *, n_iter: int, seed: int, spherical: bool,
                    max_points_per_centroid: int = 0, init: np.ndarray | None = None,
                    use_gpu: bool | None = None, n_redo: int = 1) -> np.ndarray:
    """Lloyd's k-means of in-memory ``points`` (m, D) -> centroids (K, D) float32.

    ``init`` (K, D) starts from given centroids instead of faiss's seeded random pick of K points.
    """
    x = np.ascontiguousarray(points, dtype=np.float32)  # (m, D)
    m, dim = x.shape
    if m < n_clusters:
        raise ValueError(f"cannot make {n_clusters} clusters from {m} training points")
    clustering = faiss.Clustering(dim, n_clusters)
    clustering.niter = n_iter
    clustering.seed = seed
    clustering.nredo = n_redo
    clustering.spherical = spherical
    clustering.verbose = False
    # Both bounds explicit: faiss subsamples above max * K points and warns below min * K points.
    clustering.max_points_per_centroid = max_points_per_centroid if max_points_per_centroid > 0 else m
    clustering.min_points_per_centroid = 1
    if init is not None:
        if init.shape != (n_clusters, dim):
            raise ValueError(f"init centroids {init.shape}, expected {(n_clusters, dim)}")
        faiss.copy_array_to_vector(np.ascontiguousarray(init, dtype=np.float32).ravel(), clustering.centroids)
    index, _keep_alive = flat_index(dim, spherical, use_gpu)
    clustering.train(x, index)
    return faiss.vector_to_array(clustering.centroids).reshape(n_clusters, dim).astype(np.float32)


def train_kmeans(source: VectorSource, cfg: KMeansConfig) -> np.ndarray:
    """Centroids (K, D) float32 of k-means over ``source`` (or its seeded sample of ``max_train_rows``)."""
    cfg.validate()
    points = sample_rows(source, cfg.max_train_rows, cfg.seed)  # (m, D)
    return kmeans_on_array(points, cfg.n_clusters, n_iter=cfg.n_iter, seed=cfg.seed, spherical=cfg.spherical,
                           max_points_per_centroid=cfg.max_points_per_centroid, use_gpu=cfg.use_gpu,
                           n_redo=cfg.n_redo)


def assign_array(points: np.ndarray, index: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row of ``points`` (m, D) in a filled centroid index, ``batch`` rows per call."""
    labels, scores = [], []
    for start in range(0, points.shape[0], batch):
        chunk = np.ascontiguousarray(points[start:start + batch], dtype=np.float32)  # (b, D)
        score, label = index.search(chunk, 1)  # (b, 1) each
        labels.append(label[:, 0].astype(np.int64))
        scores.append(score[:, 0].astype(np.float32))
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(labels), np.concatenate(scores)


def assign_clusters(source: VectorSource, centroids: np.ndarray, batch: int = 65536, *, spherical: bool = True,
                    use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int64, score (N,) float32) in row order, streamed shard by shard.

    The score is the cosine to the centroid when ``spherical`` (higher is closer), else the squared L2
    distance (lower is closer).
    """
    if batch < 1:
        raise ValueError("batch must be >= 1")
    if centroids.ndim != 2 or centroids.shape[1] != source.dim:
        raise ValueError(f"centroids {centroids.shape} do not match vectors of width {source.dim}")
    index, _keep_alive = flat_index(source.dim, spherical, use_gpu)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels, scores = [], []
    for _, vectors in source.iter_shards():
        shard_labels, shard_scores = assign_array(vectors, index, batch)
        labels.append(shard_labels)
        scores.append(shard_scores)
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return np.concatenate(labels), np.concatenate(scores)
