"""Hierarchical k-means with resampling and balanced hierarchical sampling (Vo et al. 2024, arXiv 2405.15613).

Level 0 clusters the points (a bounded seeded sample for training, every row assigned by streaming);
level l > 0 clusters the centroids of level l - 1, so the top level groups "concepts" and the bottom
level near-duplicates of one concept. Plain k-means on web data puts many centroids in the dense
modes; Vo et al.'s resampling-clustering step counters that: draw the ``resample_per_cluster``
points closest to each centroid (a set with the same number of points per cluster), re-run k-means
on that set starting from the current centroids, and repeat. Centroids then spread more uniformly
over the support of the data instead of following its density.

``balanced_sample`` walks the tree top-down and splits the budget as evenly as possible between the
children of each node (water-filling: a child smaller than its share gives all its points and the
rest goes to the others), so every top-level concept gets about the same number of images however
large it was in the raw pool.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from components.curation.kmeans import assign_array, assign_clusters, flat_index, kmeans_on_array, sample_rows
from components.curation.knn_graph import VectorSource

SampleStrategy = Literal["random", "closest"]


@dataclass
class HierarchicalKMeansConfig:
    levels: list[int]  # clusters per level, bottom first, e.g. [1000, 100] (Vo et al.)
    n_iter: int = 20
    resampling_steps: int = 10  # Vo et al. resampling-clustering steps per level (0: plain k-means)
    resample_per_cluster: int = 10  # points drawn per cluster (closest to the centroid) for each resampling step
    seed: int = 0
    max_train_rows: int = 0  # 0: level 0 trains on all rows; else a seeded uniform sample of this many
    use_gpu: bool | None = None
    n_redo: int = 1  # seeded k-means restarts per run, lowest objective kept (a bad random init can merge concepts)

    def validate(self) -> None:
        if not self.levels or min(self.levels) < 1:
            raise ValueError("levels needs at least one level, each with >= 1 clusters")
        if any(upper > lower for lower, upper in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError(f"levels go bottom first and cannot grow upwards: {self.levels}")
        if min(self.n_iter, self.n_redo, self.resample_per_cluster) < 1 or min(self.resampling_steps,
                                                                                  self.max_train_rows) < 0:
            raise ValueError("n_iter, n_redo, resample_per_cluster >= 1; resampling_steps, max_train_rows >= 0")


@dataclass(frozen=True)
class HierarchicalClustering:
    ids: list[str]  # row order of the source
    assignments: list[np.ndarray]  # level 0: cluster of each point (N,); level l > 0: parent of each (l-1) cluster
    centroids: list[np.ndarray]  # per level (K_l, D) float32
    point_similarity: np.ndarray | None = None  # (N,) cosine of each point to its level-0 centroid

    def point_clusters(self, level: int) -> np.ndarray:
        """(N,) cluster of every point at ``level`` (level-0 labels pushed up through the parents)."""
        labels = self.assignments[0]
        for parents in self.assignments[1:level + 1]:
            labels = parents[labels]
        return labels

    def cluster_sizes(self, level: int) -> np.ndarray:
        """(K_level,) points per cluster at ``level``."""
        return np.bincount(self.point_clusters(level), minlength=self.centroids[level].shape[0]).astype(np.int64)


def closest_per_cluster(labels: np.ndarray, similarity: np.ndarray, per_cluster: int) -> np.ndarray:
    """Indices of the ``per_cluster`` highest-similarity members of every cluster (all of a smaller one)."""
    order = np.lexsort((-similarity, labels))  # grouped by cluster, closest first
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")  # first slot of each element's cluster
    rank = np.arange(order.shape[0]) - starts  # rank within its cluster
    return np.sort(order[rank < per_cluster])


def resampled_kmeans(points: np.ndarray, n_clusters: int, cfg: HierarchicalKMeansConfig, seed: int) -> np.ndarray:
    """Spherical k-means of ``points`` (m, D) followed by ``cfg.resampling_steps`` resampling-clustering steps."""
    centroids = kmeans_on_array(points, n_clusters, n_iter=cfg.n_iter, seed=seed, spherical=True,
                                use_gpu=cfg.use_gpu, n_redo=cfg.n_redo)  # (K, D)
    for step in range(cfg.resampling_steps):
        index, _keep_alive = flat_index(points.shape[1], True, cfg.use_gpu)
        index.add(centroids)
        labels, similarity = assign_array(points, index, batch=65_536)  # (m,) each
        chosen = closest_per_cluster(labels, similarity, cfg.resample_per_cluster)  # about r per cluster
        if chosen.shape[0] < n_clusters:  # fewer points than clusters: nothing left to rebalance
            break
        centroids = kmeans_on_array(points[chosen], n_clusters, n_iter=cfg.n_iter, seed=seed + step + 1,
                                    spherical=True, init=centroids, use_gpu=cfg.use_gpu)
    return centroids


def hierarchical_kmeans(source: VectorSource, cfg: HierarchicalKMeansConfig) -> HierarchicalClustering:
    """Cluster ``source`` bottom-up into ``cfg.levels``; every row is assigned at level 0 by streaming."""
    cfg.validate()
    if source.num_rows < cfg.levels[0]:
        raise ValueError(f"{source.num_rows} rows cannot make {cfg.levels[0]} clusters")
    sample = sample_rows(source, cfg.max_train_rows, cfg.seed)  # (m, D)
    centroids = [resampled_kmeans(sample, cfg.levels[0], cfg, cfg.seed)]
    del sample
    labels, similarity = assign_clusters(source, centroids[0], spherical=True, use_gpu=cfg.use_gpu)  # (N,) each
    assignments = [labels]
    for level, n_clusters in enumerate(cfg.levels[1:], start=1):
        below = centroids[-1]  # (K_{l-1}, D): the points of this level
        upper = resampled_kmeans(below, n_clusters, cfg, cfg.seed + 1000 * level)  # (K_l, D)
        index, _keep_alive = flat_index(below.shape[1], True, cfg.use_gpu)
        index.add(upper)
        parents, _ = assign_array(below, index, batch=65_536)  # (K_{l-1},)
        assignments.append(parents)
        centroids.append(upper)
    return HierarchicalClustering(ids=source.ids(), assignments=assignments, centroids=centroids,
                                  point_similarity=similarity)


def fair_split(budget: int, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Counts (m,) <= sizes summing to min(budget, sizes.sum()), as equal as the sizes allow (water-filling).

    Going from the smallest group up, each takes min(its size, an equal share of what is left); the
    integer remainder goes one unit each to randomly chosen (seeded) groups still below their size.
    """
    counts = np.zeros(sizes.shape[0], dtype=np.int64)
    remaining = min(int(budget), int(sizes.sum()))
    order = np.argsort(sizes, kind="stable")
    for position, group in enumerate(order):
        share = remaining // (sizes.shape[0] - position)
        if sizes[group] <= share:
            counts[group] = sizes[group]
            remaining -= int(sizes[group])
            continue
        rest = order[position:]  # every one of these is larger than ``share``
        counts[rest] = share
        extra = remaining - share * rest.shape[0]
        counts[rng.permutation(rest)[:extra]] += 1
        break
    return counts


def balanced_sample(clustering: HierarchicalClustering, target_size: int, seed: int = 0,
                    strategy: str = "random") -> np.ndarray:
    """Sorted row indices (int64), ``min(target_size, N)`` of them, spread evenly over the cluster tree.

    The budget is split fairly across top-level clusters, then within each across its children, down
    to the level-0 clusters, where ``strategy`` picks "random" (seeded) points or those "closest" to
    the centroid. Deterministic for a given seed.
    """
    if strategy not in ("random", "closest"):
        raise ValueError(f"strategy must be random or closest, got {strategy!r}")
    if target_size < 0:
        raise ValueError("target_size must be >= 0")
    if strategy == "closest" and clustering.point_similarity is None:
        raise ValueError("strategy 'closest' needs point_similarity in the clustering")
    rng = np.random.default_rng(seed)
    top = len(clustering.assignments) - 1
    # Budgets per cluster, level by level from the top: (K_l,) at each step.
    sizes = clustering.cluster_sizes(top)
    budgets = fair_split(target_size, sizes, rng)
    for level in range(top, 0, -1):
        parents = clustering.assignments[level]  # (K_{l-1},) parent of each child
        child_sizes = clustering.cluster_sizes(level - 1)
        child_budgets = np.zeros(parents.shape[0], dtype=np.int64)
        for parent in np.flatnonzero(budgets):
            children = np.flatnonzero(parents == parent)
            child_budgets[children] = fair_split(int(budgets[parent]), child_sizes[children], rng)
        budgets = child_budgets
    return pick_in_leaves(clustering, budgets, strategy, rng)


def pick_in_leaves(clustering: HierarchicalClustering, budgets: np.ndarray, strategy: str,
                   rng: np.random.Generator) -> np.ndarray:
    """Take ``budgets[c]`` points of each level-0 cluster c: seeded random ones or the closest to its centroid."""
    labels = clustering.assignments[0]  # (N,)
    if strategy == "closest":
        assert clustering.point_similarity is not None
        order = np.lexsort((-clustering.point_similarity, labels))  # grouped by cluster, closest first
    else:
        order = np.lexsort((rng.permutation(labels.shape[0]), labels))  # grouped by cluster, random within
    starts = np.searchsorted(labels[order], np.arange(budgets.shape[0]), side="left")  # (K_0,)
    rank = np.arange(order.shape[0]) - starts[labels[order]]  # position within its cluster
    keep = rank < budgets[labels[order]]
    return np.sort(order[keep]).astype(np.int64)
