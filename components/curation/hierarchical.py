"""Hierarchical k-means with resampling and balanced hierarchical sampling (Vo et al. 2024, arXiv 2405.15613).

Level 0 clusters the points (a bounded seeded sample for training, every row assigned by streaming);
level l > 0 clusters the centroids of level l - 1, so the top level groups "concepts" and the bottom
level near-duplicates of one concept. Plain k-means on web data puts many centroids in the dense
modes; Vo et al.'s resampling-clustering step counters that: take the ``r`` points closest to each
centroid (a set with about the same number of points per cluster), run k-means on that set afresh
from a new k-means++ initialisation, assign every point of the level to the new centroids, and
repeat. Centroids then spread more uniformly over the support of the data instead of following its
density. Starting each run from the previous centroids instead would keep them where they were: the
resampled set is made of clumps around exactly those centroids.

The defaults follow the official implementation (facebookresearch/ssl-data-curation):
squared-L2 k-means with 50 Lloyd iterations, a greedy k-means++ start (2 + ln K candidates per centre)
for every run, 10 resampling steps per level, ``r`` about half the mean cluster size of the level, and
the level's points assigned to the last step's centroids at the end.

``balanced_sample`` walks the tree top-down and splits the budget as evenly as possible between the
children of each node (water-filling: a child smaller than its share gives all its points and the
rest goes to the others), so every top-level concept gets about the same number of images however
large it was in the raw pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from components.curation.kmeans import assign_array, assign_clusters, flat_index, kmeans_on_array, sample_rows
from components.curation.knn_graph import VectorSource

SampleStrategy = Literal["random", "closest"]
Distance = Literal["l2", "cosine"]


@dataclass
class HierarchicalKMeansConfig:
    """Defaults are the official ssl-data-curation ones (src/hierarchical_kmeans_gpu.py, configs/*.yaml)."""

    levels: list[int]  # clusters per level, bottom first, e.g. [1000, 100]
    n_iter: int = 50  # official: n_iters 50 in both configs and in every kmeans() call
    resampling_steps: int = 10  # official: n_resamples=10; n_resampling_steps 10 per level in the configs
    # Points taken per cluster at each resampling step: one int for every level or one per level (bottom
    # first). 0 (or []): ceil(mean cluster size / 2) of that level, the rule the official configs state
    # ("roughly half the average cluster size in each level") and that gives their values (10, 5, 3).
    # Below 2 the level skips resampling, as the official code does (it resamples only if sample_size > 1).
    resample_per_cluster: int | list[int] = 0
    distance: Distance = "l2"  # official: dist="l2" (plain means); "cosine": spherical k-means on unit vectors
    init_trials: int = 0  # greedy k-means++ candidates per centre; 0: 2 + int(ln K) (official, from scikit-learn)
    seed: int = 0
    max_train_rows: int = 0  # 0: level 0 trains on all rows; else a seeded uniform sample of this many
    use_gpu: bool | None = None
    n_redo: int = 1  # official num_init=1; more: seeded k-means restarts per run, the lowest cost kept

    def validate(self) -> None:
        if not self.levels or min(self.levels) < 1:
            raise ValueError("levels needs at least one level, each with >= 1 clusters")
        if any(upper > lower for lower, upper in zip(self.levels, self.levels[1:], strict=False)):
            raise ValueError(f"levels go bottom first and cannot grow upwards: {self.levels}")
        if min(self.n_iter, self.n_redo) < 1 or min(self.resampling_steps, self.max_train_rows, self.init_trials) < 0:
            raise ValueError("n_iter, n_redo >= 1; resampling_steps, max_train_rows, init_trials >= 0")
        per_level = self.resample_per_cluster
        if isinstance(per_level, list) and per_level and len(per_level) != len(self.levels):
            raise ValueError(f"resample_per_cluster has {len(per_level)} entries for {len(self.levels)} levels")
        if min(per_level if isinstance(per_level, list) else [per_level], default=0) < 0:
            raise ValueError("resample_per_cluster must be >= 0 (0: half the mean cluster size)")

    @property
    def spherical(self) -> bool:
        return self.distance == "cosine"

    def per_cluster(self, level: int, n_points: int) -> int:
        """Points taken per cluster when resampling ``level``, which clusters ``n_points`` points."""
        given = self.resample_per_cluster
        r = (given[level] if given else 0) if isinstance(given, list) else given
        return r if r > 0 else math.ceil(n_points / (2 * self.levels[level]))


@dataclass(frozen=True)
class HierarchicalClustering:
    ids: list[str]  # row order of the source
    assignments: list[np.ndarray]  # level 0: cluster of each point (N,); level l > 0: parent of each (l-1) cluster
    centroids: list[np.ndarray]  # per level (K_l, D) float32
    # (N,) closeness of each point to its level-0 centroid, higher is closer: minus the squared L2
    # distance (distance "l2") or the cosine (distance "cosine").
    point_similarity: np.ndarray | None = None

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


def nearest_centroids(points: np.ndarray, centroids: np.ndarray, spherical: bool,
                      use_gpu: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """(labels (m,), closeness (m,)): nearest centroid of each point, closeness higher is closer."""
    index, _keep_alive = flat_index(points.shape[1], spherical, use_gpu)
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    labels, scores = assign_array(points, index, batch=65_536)  # scores: cosine, or squared L2 distance
    return labels, scores if spherical else -scores


def step_seed(seed: int, step: int) -> int:
    """Seed of the k-means++ start of resampling step ``step`` (0: the first, plain k-means run)."""
    return seed + step


def resampled_kmeans(points: np.ndarray, n_clusters: int, cfg: HierarchicalKMeansConfig, per_cluster: int,
                     seed: int) -> np.ndarray:
    """Centroids (K, D) of k-means on ``points`` (m, D) then ``cfg.resampling_steps`` resampling steps.

    Every run, the first and each resampling one, starts from its own seeded k-means++ pick, as in the
    official code. A step takes the ``per_cluster`` points closest to each current centroid (clusters
    from assigning all ``points``), runs k-means on them, and the new centroids replace the old ones.
    """
    def kmeans(x: np.ndarray, step: int) -> np.ndarray:
        return kmeans_on_array(x, n_clusters, n_iter=cfg.n_iter, seed=step_seed(seed, step), spherical=cfg.spherical,
                               init="k-means++", use_gpu=cfg.use_gpu, n_redo=cfg.n_redo,
                               n_local_trials=cfg.init_trials)

    centroids = kmeans(points, 0)  # (K, D)
    if per_cluster < 2:  # one point per cluster is just the K centroid-nearest points: nothing to re-spread
        return centroids
    for step in range(1, cfg.resampling_steps + 1):
        labels, closeness = nearest_centroids(points, centroids, cfg.spherical, cfg.use_gpu)  # (m,) each
        chosen = closest_per_cluster(labels, closeness, per_cluster)  # about per_cluster from each cluster
        if chosen.shape[0] < n_clusters:  # clusters emptied out: too few points left to make K clusters
            break
        centroids = kmeans(points[chosen], step)
    return centroids


def hierarchical_kmeans(source: VectorSource, cfg: HierarchicalKMeansConfig) -> HierarchicalClustering:
    """Cluster ``source`` bottom-up into ``cfg.levels``; every row is assigned at level 0 by streaming."""
    cfg.validate()
    if source.num_rows < cfg.levels[0]:
        raise ValueError(f"{source.num_rows} rows cannot make {cfg.levels[0]} clusters")
    sample = sample_rows(source, cfg.max_train_rows, cfg.seed)  # (m, D)
    per_cluster = cfg.per_cluster(0, sample.shape[0])
    centroids = [resampled_kmeans(sample, cfg.levels[0], cfg, per_cluster, cfg.seed)]
    del sample
    labels, scores = assign_clusters(source, centroids[0], spherical=cfg.spherical, use_gpu=cfg.use_gpu)  # (N,)
    assignments = [labels]
    for level, n_clusters in enumerate(cfg.levels[1:], start=1):
        below = centroids[-1]  # (K_{l-1}, D): the points of this level
        per_cluster = cfg.per_cluster(level, below.shape[0])
        upper = resampled_kmeans(below, n_clusters, cfg, per_cluster, cfg.seed + 1000 * level)  # (K_l, D)
        parents, _ = nearest_centroids(below, upper, cfg.spherical, cfg.use_gpu)  # (K_{l-1},)
        assignments.append(parents)
        centroids.append(upper)
    return HierarchicalClustering(ids=source.ids(), assignments=assignments, centroids=centroids,
                                  point_similarity=scores if cfg.spherical else -scores)


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
