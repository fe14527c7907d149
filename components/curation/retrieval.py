"""Retrieval-based curation: pool images close to a curated seed set (DINOv2 paper §3, appendix A).

Two ways, as in the paper, usable alone or together (``mode="both"`` takes the union):

* sample-based: the ``n_per_seed`` nearest pool images of every seed image (the paper uses N = 4),
  ignoring neighbours with cosine below ``min_similarity``;
* cluster-based: k-means over the pool; every cluster holding at least ``min_seeds_per_cluster``
  seed images (the paper: more than 3) contributes up to ``max_per_cluster`` of its pool images
  (the paper: 10 000), drawn with a fixed seed.

Seed sets are small and pools huge, so the sample-based search keeps the seed vectors and a running
top-N per seed in memory and streams the pool one shard at a time (exact brute force, faiss.knn per
shard): memory is O(seeds * N) whatever the pool size. With ``knn.index`` set to "ivf" (or "auto" on a
large pool) it instead builds knn_graph's index over the pool and queries it with the seeds: faster
for large seed sets, approximate, and it holds the pool vectors in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from components.curation.kmeans import KMeansConfig, assign_clusters, train_kmeans
from components.curation.knn_graph import InMemoryVectors, KnnConfig, VectorSource, cross_edges, resolve_kind

MODES = ("sample", "cluster", "both")


@dataclass
class RetrievalConfig:
    mode: str = "sample"  # "sample" | "cluster" | "both"
    n_per_seed: int = 4  # sample-based: N nearest pool images per seed image (paper: 4)
    min_similarity: float = 0.0  # sample-based: ignore neighbours below this cosine
    n_clusters: int = 100  # cluster-based: k-means over the pool
    min_seeds_per_cluster: int = 4  # cluster-based: a cluster qualifies with at least this many seeds (paper: > 3)
    max_per_cluster: int = 10000  # cluster-based: take up to M images from each qualifying cluster (seeded)
    seed: int = 0
    knn: KnnConfig = field(default_factory=KnnConfig)  # sample-based index choice: flat streams, ivf indexes the pool
    kmeans_n_iter: int = 20  # cluster-based: Lloyd iterations
    kmeans_max_train_rows: int = 0  # cluster-based: 0 trains on the whole pool; else a seeded sample of this many

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if min(self.n_per_seed, self.n_clusters, self.min_seeds_per_cluster, self.max_per_cluster) < 1:
            raise ValueError("n_per_seed, n_clusters, min_seeds_per_cluster and max_per_cluster must be >= 1")
        if not -1.0 <= self.min_similarity <= 1.0:
            raise ValueError("min_similarity is a cosine: within [-1, 1]")
        if self.kmeans_n_iter < 1 or self.kmeans_max_train_rows < 0:
            raise ValueError("kmeans_n_iter must be >= 1, kmeans_max_train_rows >= 0")
        self.knn.validate()


@dataclass(frozen=True)
class RetrievalResult:
    rows: np.ndarray  # selected pool row indices, sorted, unique (int64)
    by: dict[str, np.ndarray]  # "sample" / "cluster" -> the rows each method chose (sorted, unique)
    seed_of: dict[int, str]  # pool row -> id of the seed that retrieved it (sample-based)
    stats: dict[str, Any]  # counts: seeds, retrieved per method, union, qualifying clusters, ...


def load_all(source: VectorSource) -> tuple[list[str], np.ndarray]:
    """Ids and vectors (n, D) float32 of a small source (the seed set) in memory."""
    ids: list[str] = []
    parts = []
    for shard_ids, vectors in source.iter_shards():
        ids.extend(shard_ids)
        parts.append(np.asarray(vectors, dtype=np.float32))
    vectors = np.concatenate(parts) if parts else np.zeros((0, source.dim), np.float32)
    return ids, np.ascontiguousarray(vectors)


def streamed_top_n(pool: VectorSource, queries: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``n`` pool rows per query, streaming the pool: (cosine (q, n), row (q, n)); -1 rows pad.

    Ties keep the lower pool row, so the result does not depend on shard boundaries.
    """
    q = queries.shape[0]
    best_cos = np.full((q, n), -np.inf, dtype=np.float32)  # (q, n)
    best_row = np.full((q, n), -1, dtype=np.int64)  # (q, n)
    base = 0
    for _, vectors in pool.iter_shards():
        shard = np.ascontiguousarray(vectors, dtype=np.float32)  # (s, D)
        k = min(n, shard.shape[0])
        if k > 0 and q > 0:
            cosine, local = faiss.knn(queries, shard, k, metric=faiss.METRIC_INNER_PRODUCT)  # (q, k) each
            cos_all = np.concatenate([best_cos, cosine], axis=1)  # (q, n + k)
            row_all = np.concatenate([best_row, np.where(local >= 0, local + base, -1)], axis=1)
            tie_row = np.where(row_all >= 0, row_all, np.iinfo(np.int64).max)
            order = np.lexsort((tie_row, -cos_all), axis=1)[:, :n]  # best cosine first, then lower row
            best_cos = np.take_along_axis(cos_all, order, axis=1)
            best_row = np.take_along_axis(row_all, order, axis=1)
        base += shard.shape[0]
    return best_cos, best_row


def sample_based(pool: VectorSource, seeds: VectorSource, cfg: RetrievalConfig) -> tuple[np.ndarray, dict[int, str]]:
    """Pool rows among the ``n_per_seed`` nearest of some seed (cosine >= min_similarity), and who found each."""
    seed_ids, seed_vectors = load_all(seeds)
    if not seed_ids or pool.num_rows == 0:
        return np.zeros(0, np.int64), {}
    if resolve_kind(cfg.knn.index, pool.num_rows, cfg.knn.ivf_min_rows) == "flat":
        cosine, rows = streamed_top_n(pool, seed_vectors, cfg.n_per_seed)  # (q, n) each
        seed_row = np.broadcast_to(np.arange(len(seed_ids))[:, None], rows.shape)
        keep = (rows >= 0) & (cosine >= cfg.min_similarity)
        src, dst, cos = seed_row[keep], rows[keep], cosine[keep]
    else:
        # cross_edges keeps cosine strictly above its threshold; nextafter makes that ">= min_similarity".
        threshold = float(np.nextafter(np.float32(cfg.min_similarity), np.float32(-np.inf)))
        knn = KnnConfig(k=cfg.n_per_seed, threshold=threshold, index=cfg.knn.index, nlist=cfg.knn.nlist,
                        nprobe=cfg.knn.nprobe, ivf_min_rows=cfg.knn.ivf_min_rows, use_gpu=cfg.knn.use_gpu,
                        query_batch=cfg.knn.query_batch)
        edges = cross_edges(InMemoryVectors(seed_ids, seed_vectors), pool, knn)
        src, dst, cos = edges.src, edges.dst, edges.cosine
    # A row found by several seeds is credited to the most similar one (then the first seed).
    order = np.lexsort((src, -cos, dst))
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = dst[order][1:] != dst[order][:-1]
    winners = order[first]
    seed_of = {int(row): seed_ids[int(s)] for row, s in zip(dst[winners], src[winners], strict=True)}
    return np.unique(dst).astype(np.int64), seed_of


def cluster_based(pool: VectorSource, seeds: VectorSource, cfg: RetrievalConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Pool rows of the k-means clusters holding >= ``min_seeds_per_cluster`` seeds, <= ``max_per_cluster`` each."""
    n_clusters = min(cfg.n_clusters, pool.num_rows)
    if n_clusters == 0 or seeds.num_rows == 0:
        return np.zeros(0, np.int64), {"qualifying_clusters": 0, "n_clusters": n_clusters}
    kmeans = KMeansConfig(n_clusters=n_clusters, n_iter=cfg.kmeans_n_iter, seed=cfg.seed, spherical=True,
                          max_train_rows=cfg.kmeans_max_train_rows, use_gpu=cfg.knn.use_gpu)
    centroids = train_kmeans(pool, kmeans)  # (K, D)
    pool_labels, _ = assign_clusters(pool, centroids, use_gpu=cfg.knn.use_gpu)  # (N,)
    seed_labels, _ = assign_clusters(seeds, centroids, use_gpu=cfg.knn.use_gpu)  # (S,)
    seeds_per_cluster = np.bincount(seed_labels, minlength=n_clusters)  # (K,)
    qualifying = np.flatnonzero(seeds_per_cluster >= cfg.min_seeds_per_cluster)
    rng = np.random.default_rng(cfg.seed)
    chosen = []
    for cluster in qualifying:
        members = np.flatnonzero(pool_labels == cluster)
        if members.shape[0] > cfg.max_per_cluster:
            members = rng.choice(members, size=cfg.max_per_cluster, replace=False)
        chosen.append(members)
    rows = np.unique(np.concatenate(chosen)).astype(np.int64) if chosen else np.zeros(0, np.int64)
    return rows, {"qualifying_clusters": int(qualifying.shape[0]), "n_clusters": n_clusters,
                  "seeds_in_qualifying_clusters": int(seeds_per_cluster[qualifying].sum())}


def retrieve(pool: VectorSource, seeds: VectorSource, cfg: RetrievalConfig) -> RetrievalResult:
    """Pool rows close to the seed set, by sample-based and/or cluster-based retrieval."""
    cfg.validate()
    if pool.num_rows and seeds.num_rows and pool.dim != seeds.dim:
        raise ValueError(f"pool vectors have width {pool.dim}, seed vectors {seeds.dim}")
    by: dict[str, np.ndarray] = {}
    seed_of: dict[int, str] = {}
    stats: dict[str, Any] = {"mode": cfg.mode, "seeds": seeds.num_rows, "pool_rows": pool.num_rows}
    if cfg.mode in ("sample", "both"):
        by["sample"], seed_of = sample_based(pool, seeds, cfg)
        stats["retrieved_sample"] = int(by["sample"].shape[0])
    if cfg.mode in ("cluster", "both"):
        by["cluster"], cluster_stats = cluster_based(pool, seeds, cfg)
        stats["retrieved_cluster"] = int(by["cluster"].shape[0])
        stats.update(cluster_stats)
    rows = np.unique(np.concatenate(list(by.values()))).astype(np.int64)
    stats["union"] = int(rows.shape[0])
    return RetrievalResult(rows=rows, by=by, seed_of=seed_of, stats=stats)
