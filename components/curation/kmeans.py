"""Faiss k-means over embedding shards: train on a bounded, seeded sample, assign every row by streaming.

Training needs its points in memory, so it runs on all rows (``max_train_rows == 0``, small pools) or
on a seeded uniform sample of ``max_train_rows`` rows read shard by shard. Assignment then streams the
whole source one shard at a time, so only the centroids and the (N,) outputs stay resident.

Faiss silently subsamples to ``max_points_per_centroid`` (256 by default) points per centroid before
training; here that is always set explicitly (0 means "every training point"), so the sample size is
decided in one visible place. ``spherical`` k-means (unit vectors, centroids renormalised after each
update, assignment by inner product) is cosine k-means, the variant used on DINOv2 embeddings.

Faiss starts Lloyd's iterations from K points picked uniformly at random. ``init="k-means++"`` starts
them from a seeded greedy k-means++ pick instead (Arthur & Vassilvitskii 2007, with scikit-learn's
greedy refinement), the initialisation the official ssl-data-curation code (Vo et al. 2024) uses for
every k-means run; its spread-out start matters there because hierarchical k-means re-runs k-means on
small, evenly spread resampled sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import faiss
import numpy as np

from components.curation.knn_graph import VectorSource, gpu_count

InitMethod = Literal["random", "k-means++"]


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


def default_local_trials(n_clusters: int) -> int:
    """Greedy k-means++ candidates per centroid: 2 + int(ln K), scikit-learn's and the official code's default."""
    return 2 + int(np.log(n_clusters))


def squared_distances(x: np.ndarray, sq_norms: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(C, m) float64 squared L2 distances of the rows of ``x`` (m, D) to ``centres`` (C, D).

    The products run in float32 (the memory-bound part); sums in float64 so the cumulative sums over
    a million points stay exact enough to sample from. Rounding can make a distance slightly negative.
    """
    products = (x @ centres.T).T.astype(np.float64)  # (C, m); x @ c.T is the faster BLAS layout for thin c
    centre_norms = np.einsum("cd,cd->c", centres, centres, dtype=np.float64)  # (C,)
    return np.maximum(sq_norms[None, :] + centre_norms[:, None] - 2.0 * products, 0.0)


def kmeans_plus_plus(points: np.ndarray, n_clusters: int, seed: int, n_local_trials: int = 0) -> np.ndarray:
    """Row indices (K,) int64 of a seeded greedy k-means++ pick of ``n_clusters`` of ``points`` (m, D).

    The first centre is a uniform pick; each next one is the best of ``n_local_trials`` candidates
    (0: ``default_local_trials``) drawn with probability proportional to the squared L2 distance to the
    nearest centre so far (D^2 sampling), "best" meaning the lowest k-means potential once added. One
    trial is plain k-means++. Only distances to the new candidates are computed at each step; the
    running minimum (m,) carries the rest, so the cost is K x trials x m x D and the memory trials x m.
    On unit vectors squared L2 is 2 - 2 cos, the official code's cosine variant, so this serves both.
    Random draws, in order: ``integers(m)`` once, then ``random(trials)`` per further centre.
    """
    x = np.ascontiguousarray(points, dtype=np.float32)  # (m, D)
    m = x.shape[0]
    if not 1 <= n_clusters <= m:
        raise ValueError(f"cannot pick {n_clusters} k-means++ centres from {m} points")
    if n_local_trials < 0:
        raise ValueError("n_local_trials must be >= 0 (0: 2 + int(ln K))")
    trials = n_local_trials or default_local_trials(n_clusters)
    rng = np.random.default_rng(seed)
    sq_norms = np.einsum("md,md->m", x, x, dtype=np.float64)  # (m,)
    chosen = np.empty(n_clusters, dtype=np.int64)
    chosen[0] = rng.integers(m)
    closest = squared_distances(x, sq_norms, x[chosen[:1]])[0]  # (m,) distance to the nearest centre
    for c in range(1, n_clusters):
        cumulative = np.cumsum(closest)  # (m,)
        targets = rng.random(trials) * cumulative[-1]  # (t,)
        # side="right": a point with zero mass (a centre already) can only come up if all mass is zero.
        candidates = np.minimum(np.searchsorted(cumulative, targets, side="right"), m - 1)  # (t,)
        with_candidate = np.minimum(closest[None, :], squared_distances(x, sq_norms, x[candidates]))  # (t, m)
        best = int(np.argmin(with_candidate.sum(axis=1)))
        chosen[c] = candidates[best]
        closest = with_candidate[best]
    return chosen


def lloyd(x: np.ndarray, start: np.ndarray | None, n_clusters: int, *, n_iter: int, seed: int,
          spherical: bool, max_points_per_centroid: int, use_gpu: bool | None, n_redo: int) -> np.ndarray:
    """Faiss's Lloyd iterations on ``x`` (m, D) float32 from ``start`` (K, D), or faiss's random pick if None."""
    m, dim = x.shape
    clustering = faiss.Clustering(dim, n_clusters)
    clustering.niter = n_iter
    clustering.seed = seed
    clustering.nredo = n_redo
    clustering.spherical = spherical
    clustering.verbose = False
    # Both bounds explicit: faiss subsamples above max * K points and warns below min * K points.
    clustering.max_points_per_centroid = max_points_per_centroid if max_points_per_centroid > 0 else m
    clustering.min_points_per_centroid = 1
    if start is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(start, dtype=np.float32).ravel(), clustering.centroids)
    index, _keep_alive = flat_index(dim, spherical, use_gpu)
    clustering.train(x, index)
    return faiss.vector_to_array(clustering.centroids).reshape(n_clusters, dim).astype(np.float32)


def kmeans_cost(x: np.ndarray, centroids: np.ndarray, spherical: bool, use_gpu: bool | None) -> float:
    """Lower is better: the sum of squared L2 distances to the nearest centroid, or minus the sum of cosines."""
    index, _keep_alive = flat_index(x.shape[1], spherical, use_gpu)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, scores = assign_array(x, index, batch=65_536)  # (m,)
    total = float(scores.astype(np.float64).sum())
    return -total if spherical else total


def kmeans_on_array(points: np.ndarray, n_clusters: int, *, n_iter: int, seed: int, spherical: bool,
                    max_points_per_centroid: int = 0, init: np.ndarray | InitMethod | None = None,
                    use_gpu: bool | None = None, n_redo: int = 1, n_local_trials: int = 0) -> np.ndarray:
    """Lloyd's k-means of in-memory ``points`` (m, D) -> centroids (K, D) float32.

    ``init``: None or "random" is faiss's seeded random pick of K points (faiss runs the ``n_redo``
    restarts); "k-means++" is ``kmeans_plus_plus`` seeded with ``seed + restart`` for each of the
    ``n_redo`` restarts, the lowest-cost run kept; an array (K, D) starts from those centroids.
    """
    x = np.ascontiguousarray(points, dtype=np.float32)  # (m, D)
    m, dim = x.shape
    if m < n_clusters:
        raise ValueError(f"cannot make {n_clusters} clusters from {m} training points")

    def run(start: np.ndarray | None, restarts: int) -> np.ndarray:
        return lloyd(x, start, n_clusters, n_iter=n_iter, seed=seed, spherical=spherical,
                     max_points_per_centroid=max_points_per_centroid, use_gpu=use_gpu, n_redo=restarts)

    if isinstance(init, np.ndarray):
        if init.shape != (n_clusters, dim):
            raise ValueError(f"init centroids {init.shape}, expected {(n_clusters, dim)}")
        return run(init, 1)  # faiss would restart from the same centroids: one run is all there is
    if init is None or init == "random":
        return run(None, n_redo)
    if init != "k-means++":
        raise ValueError(f"init must be 'random', 'k-means++' or an array of centroids, got {init!r}")
    best, best_cost = None, np.inf
    for restart in range(n_redo):
        start = x[kmeans_plus_plus(x, n_clusters, seed + restart, n_local_trials)]  # (K, D)
        centroids = run(start, 1)
        cost = kmeans_cost(x, centroids, spherical, use_gpu) if n_redo > 1 else 0.0
        if best is None or cost < best_cost:
            best, best_cost = centroids, cost
    assert best is not None
    return best


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
