"""Hierarchical k-means with resampling and balanced sampling (Vo et al. 2024): a consistent tree over known
nested blobs, resampling against a plain numpy loop, resampling with fresh k-means++ starts moving
centroids off a dense mode (and warm starts not), the official per-level sample sizes, water-filling
budgets against a brute-force reference, and balanced vs uniform sampling on a mixture where one concept
is 50x larger than the others.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from components.curation.hierarchical import (
    HierarchicalClustering,
    HierarchicalKMeansConfig,
    balanced_sample,
    closest_per_cluster,
    fair_split,
    hierarchical_kmeans,
    nearest_centroids,
    resampled_kmeans,
    step_seed,
)
from components.curation.kmeans import kmeans_on_array, kmeans_plus_plus
from components.curation.knn_graph import InMemoryVectors


def nested_blobs(groups: int, per_group: int, size: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``groups`` far-apart concepts, each ``per_group`` sub-blobs of ``size`` points: unit vectors, group labels."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:groups] * 4.0  # orthogonal concept directions
    points, labels = [], []
    for group in range(groups):
        for _ in range(per_group):
            sub = centres[group] + rng.standard_normal(dim) * 0.8  # a sub-concept near its concept
            points.append(sub + 0.05 * rng.standard_normal((size, dim)))
            labels += [group] * size
    x = np.concatenate(points)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), np.array(labels)


def source_of(x: np.ndarray, shard_size: int = 100) -> InMemoryVectors:
    return InMemoryVectors([f"p{i}" for i in range(x.shape[0])], x, shard_size=shard_size)


def test_two_levels_form_a_consistent_tree_over_nested_blobs() -> None:
    x, groups = nested_blobs(groups=4, per_group=5, size=40, dim=16, seed=0)
    cfg = HierarchicalKMeansConfig(levels=[20, 4], n_iter=20, resampling_steps=2, resample_per_cluster=[10, 3], seed=1)
    tree = hierarchical_kmeans(source_of(x), cfg)
    assert tree.ids == [f"p{i}" for i in range(x.shape[0])]
    assert tree.assignments[0].shape == (800,) and tree.assignments[1].shape == (20,)
    assert tree.centroids[0].shape == (20, 16) and tree.centroids[1].shape == (4, 16)
    assert tree.assignments[0].max() < 20 and tree.assignments[1].max() < 4
    np.testing.assert_array_equal(tree.point_clusters(1), tree.assignments[1][tree.assignments[0]])
    assert tree.cluster_sizes(0).sum() == 800 and tree.cluster_sizes(1).sum() == 800
    for top in range(4):  # a top cluster's size is the sum of its children's
        assert tree.cluster_sizes(1)[top] == tree.cluster_sizes(0)[tree.assignments[1] == top].sum()
    assert adjusted_rand_score(groups, tree.point_clusters(1)) == 1.0  # the four concepts, recovered
    assert tree.point_similarity is not None  # official distance: minus the squared L2 distance
    squared = ((x[:, None, :] - tree.centroids[0][None]) ** 2).sum(-1)  # (N, K_0)
    np.testing.assert_array_equal(tree.assignments[0], squared.argmin(axis=1))
    np.testing.assert_allclose(tree.point_similarity, -squared.min(axis=1), atol=1e-5)
    cosine = hierarchical_kmeans(source_of(x), HierarchicalKMeansConfig(levels=[20, 4], distance="cosine", seed=1))
    np.testing.assert_allclose(np.linalg.norm(cosine.centroids[0], axis=1), 1.0, atol=1e-5)
    assert cosine.point_similarity is not None
    np.testing.assert_allclose(cosine.point_similarity,
                               np.einsum("nd,nd->n", x, cosine.centroids[0][cosine.assignments[0]]), atol=1e-5)
    assert adjusted_rand_score(groups, cosine.point_clusters(1)) == 1.0


def test_same_seed_same_tree() -> None:
    x, _ = nested_blobs(groups=3, per_group=4, size=30, dim=12, seed=2)
    cfg = HierarchicalKMeansConfig(levels=[12, 3], resampling_steps=3, seed=5, max_train_rows=300)
    first, second = hierarchical_kmeans(source_of(x), cfg), hierarchical_kmeans(source_of(x, 7), cfg)
    for a, b in zip(first.assignments + first.centroids, second.assignments + second.centroids, strict=True):
        np.testing.assert_array_equal(a, b)


def reference_resampled_kmeans(points: np.ndarray, n_clusters: int, n_iter: int, steps: int, per_cluster: int,
                                seed: int) -> np.ndarray:
    """The resampling loop written out plainly in float64 (Lloyd by hand, per-cluster sorts in Python).

    Only the k-means++ pick is shared with the code under test (it has its own reference test).
    """
    x = points.astype(np.float64)

    def lloyd(data: np.ndarray, step: int) -> np.ndarray:
        centroids = data[kmeans_plus_plus(data, n_clusters, seed=step_seed(seed, step))]
        for _ in range(n_iter):
            labels = ((data[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(axis=1)
            centroids = np.stack([data[labels == j].mean(axis=0) for j in range(n_clusters)])
        return centroids

    centroids = lloyd(x, 0)
    for step in range(1, steps + 1):
        squared = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)  # (m, K)
        labels = squared.argmin(axis=1)
        chosen = []
        for j in range(n_clusters):
            members = np.flatnonzero(labels == j)
            chosen += sorted(members, key=lambda i: squared[i, j])[:per_cluster]
        centroids = lloyd(x[np.sort(chosen)], step)
    return centroids


def test_resampled_kmeans_matches_a_plain_reference_loop() -> None:
    # Unstructured points and few Lloyd iterations: the result depends on every start, so a warm start
    # or a different resampled set would show.
    points = np.random.default_rng(4).uniform(-1, 1, size=(90, 2)).astype(np.float32)
    cfg = HierarchicalKMeansConfig(levels=[5], n_iter=4, resampling_steps=3, seed=7)
    got = resampled_kmeans(points, 5, cfg, per_cluster=6, seed=7)
    np.testing.assert_allclose(got, reference_resampled_kmeans(points, 5, 4, 3, 6, seed=7), atol=1e-5)
    plain = reference_resampled_kmeans(points, 5, 4, 0, 6, seed=7)
    assert np.abs(got - plain).max() > 1e-2  # the steps moved the centroids
    # One point per cluster skips resampling, as the official code does (sample_size > 1 only).
    np.testing.assert_allclose(resampled_kmeans(points, 5, cfg, per_cluster=1, seed=7), plain, atol=1e-5)


def dense_mode_mixture(seed: int) -> np.ndarray:
    """(4000, 2): 3000 points in a tight Gaussian at the origin, 1000 spread uniformly over [-5, 5]^2."""
    rng = np.random.default_rng(seed)
    return np.concatenate([0.3 * rng.standard_normal((3000, 2)),
                           rng.uniform(-5, 5, size=(1000, 2))]).astype(np.float32)


def in_dense_mode(centroids: np.ndarray) -> int:
    return int((np.linalg.norm(centroids, axis=1) < 1.0).sum())


def test_resampling_with_fresh_starts_moves_centroids_off_a_dense_mode() -> None:
    x = dense_mode_mixture(0)
    n_clusters = 30  # uniform over the support would put about 30 * pi / 100 < 1 centroid in the unit disc
    cfg = HierarchicalKMeansConfig(levels=[n_clusters], seed=0)  # official: 10 steps, r = ceil(m / 2K)
    per_cluster = cfg.per_cluster(0, x.shape[0])
    assert per_cluster == 67
    plain = resampled_kmeans(x, n_clusters, HierarchicalKMeansConfig(levels=[n_clusters], resampling_steps=0),
                             per_cluster, seed=0)
    resampled = resampled_kmeans(x, n_clusters, cfg, per_cluster, seed=0)
    warm = plain  # the same steps, each k-means started from the current centroids instead
    for _ in range(cfg.resampling_steps):
        labels, closeness = nearest_centroids(x, warm, spherical=False, use_gpu=False)
        warm = kmeans_on_array(x[closest_per_cluster(labels, closeness, per_cluster)], n_clusters,
                               n_iter=cfg.n_iter, seed=0, spherical=False, init=warm)
    assert in_dense_mode(plain) >= 5, in_dense_mode(plain)  # plain k-means follows the density
    assert in_dense_mode(resampled) <= 2, in_dense_mode(resampled)
    assert in_dense_mode(warm) >= in_dense_mode(plain) - 1, in_dense_mode(warm)  # warm starts stay put


@pytest.mark.parametrize(("levels", "points", "official"), [
    ([5000, 1000], [None, 5000], [None, 3]),  # configs/2levels_random_embeddings.yaml: sample_size [10, 3]
    ([500_000, 50_000, 10_000], [10_000_000, 500_000, 50_000], [10, 5, 3]),  # 4levels_web_based_images.yaml
])
def test_default_sample_size_is_half_the_mean_cluster_size_as_in_the_official_configs(
        levels: list[int], points: list[int | None], official: list[int | None]) -> None:
    cfg = HierarchicalKMeansConfig(levels=levels)
    for level, (n_points, expected) in enumerate(zip(points, official, strict=True)):
        if n_points is not None:
            assert cfg.per_cluster(level, n_points) == expected
    given = HierarchicalKMeansConfig(levels=levels, resample_per_cluster=7)
    assert given.per_cluster(len(levels) - 1, 1) == 7
    assert HierarchicalKMeansConfig(levels=[100, 10]).per_cluster(0, 999) == math.ceil(999 / 200)
    for automatic in ([], [0, 0]):  # what the curate stage passes when balance.resample_per_cluster is []
        cfg = HierarchicalKMeansConfig(levels=[100, 10], resample_per_cluster=automatic)
        cfg.validate()
        assert (cfg.per_cluster(0, 2000), cfg.per_cluster(1, 100)) == (10, 5)


def brute_force_fair(budget: int, sizes: list[int]) -> tuple[int, int]:
    """(largest, smallest) count among groups below their size, over the most even feasible split."""
    best: tuple[int, int] | None = None
    for counts in itertools.product(*(range(s + 1) for s in sizes)):
        if sum(counts) != min(budget, sum(sizes)):
            continue
        open_counts = [c for c, s in zip(counts, sizes, strict=True) if c < s] or [max(counts)]
        spread = (max(open_counts), min(counts))
        if best is None or spread[0] - spread[1] < best[0] - best[1]:
            best = spread
    assert best is not None
    return best


@pytest.mark.parametrize(("budget", "sizes"), [(40, [1, 5, 10, 100]), (8, [10, 10, 10]), (7, [2, 0, 9, 3]),
                                               (100, [3, 4, 5]), (0, [3, 3])])
def test_fair_split_is_exact_and_as_even_as_possible(budget: int, sizes: list[int]) -> None:
    counts = fair_split(budget, np.array(sizes, dtype=np.int64), np.random.default_rng(0))
    assert counts.sum() == min(budget, sum(sizes))
    assert np.all(counts <= np.array(sizes)) and np.all(counts >= 0)
    if sum(sizes) and budget:
        unfilled = counts[counts < np.array(sizes)]
        spread = int(unfilled.max() - counts.min()) if unfilled.size else 0
        best_high, best_low = brute_force_fair(budget, sizes)
        assert spread <= best_high - best_low
    np.testing.assert_array_equal(fair_split(40, np.array([1, 5, 10, 100]), np.random.default_rng(1)), [1, 5, 10, 24])


@pytest.fixture(scope="module")
def imbalanced_tree() -> tuple[HierarchicalClustering, np.ndarray]:
    """Four concepts, one 50x larger than each of the other three."""
    rng = np.random.default_rng(3)
    sizes = [5000, 100, 100, 100]
    centres = np.eye(8)[:4] * 4.0
    labels = np.repeat(np.arange(4), sizes)
    x = centres[labels] + 0.4 * rng.standard_normal((labels.shape[0], 8))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    cfg = HierarchicalKMeansConfig(levels=[24, 4], n_iter=20, resampling_steps=3, seed=0, n_redo=5)
    return hierarchical_kmeans(source_of(x, 1000), cfg), labels


def test_balanced_sample_evens_out_an_imbalanced_mixture(
        imbalanced_tree: tuple[HierarchicalClustering, np.ndarray]) -> None:
    tree, concepts = imbalanced_tree
    assert adjusted_rand_score(concepts, tree.point_clusters(1)) > 0.95
    chosen = balanced_sample(tree, 400, seed=0)
    assert chosen.shape == (400,) and chosen.dtype == np.int64
    assert np.all(np.diff(chosen) > 0)  # sorted, unique
    per_concept = np.bincount(concepts[chosen], minlength=4)
    assert per_concept.min() >= 90 and per_concept.max() <= 110, per_concept  # about 100 each
    uniform = np.random.default_rng(0).choice(concepts.shape[0], size=400, replace=False)
    uniform_counts = np.bincount(concepts[uniform], minlength=4)
    assert uniform_counts[0] > 330 and uniform_counts[1:].max() < 25, uniform_counts  # what balancing fixes
    np.testing.assert_array_equal(chosen, balanced_sample(tree, 400, seed=0))
    assert not np.array_equal(chosen, balanced_sample(tree, 400, seed=1))


def test_balanced_sample_size_limits_and_closest_strategy(
        imbalanced_tree: tuple[HierarchicalClustering, np.ndarray]) -> None:
    tree, _ = imbalanced_tree
    n = 5300
    for target in (0, 1, 37, 1000, n, n + 50):
        assert balanced_sample(tree, target, seed=2).shape == (min(target, n),)
    np.testing.assert_array_equal(balanced_sample(tree, n + 50), np.arange(n))
    closest = balanced_sample(tree, 500, strategy="closest")
    assert closest.shape == (500,)
    assert tree.point_similarity is not None
    picked = np.zeros(n, dtype=bool)
    picked[closest] = True
    for leaf in range(24):  # within each leaf, every picked point is at least as close as every other one
        members = tree.assignments[0] == leaf
        if picked[members].any() and (~picked[members]).any():
            assert tree.point_similarity[members & picked].min() >= tree.point_similarity[members & ~picked].max()
    with pytest.raises(ValueError, match="strategy"):
        balanced_sample(tree, 10, strategy="largest")


@pytest.mark.parametrize("levels", [[], [0], [4, 8]])
def test_invalid_levels_are_refused(levels: list[int]) -> None:
    with pytest.raises(ValueError):
        HierarchicalKMeansConfig(levels=levels).validate()


@pytest.mark.parametrize("per_cluster", [[10], [10, 3, 2], -1, [5, -1]])
def test_invalid_resample_sizes_are_refused(per_cluster: int | list[int]) -> None:
    with pytest.raises(ValueError, match="resample_per_cluster"):
        HierarchicalKMeansConfig(levels=[20, 4], resample_per_cluster=per_cluster).validate()


def test_the_balance_section_forwards_every_kmeans_setting() -> None:
    from components.curation.config import BalanceSection

    section = BalanceSection(levels=[9, 3], n_iter=7, resampling_steps=4, resample_per_cluster=[5, 2],
                             max_train_rows=123, distance="cosine", init_trials=1, n_redo=3, seed=11)
    cfg = section.kmeans_config([8, 3])
    shared = {f.name for f in dataclasses.fields(BalanceSection)} & {f.name for f in dataclasses.fields(cfg)}
    assert shared - {"levels"} == {"n_iter", "resampling_steps", "resample_per_cluster", "max_train_rows",
                                   "distance", "init_trials", "n_redo", "seed"}
    for name in shared - {"levels"}:
        assert getattr(cfg, name) == getattr(section, name), name
    assert cfg.levels == [8, 3]
    with pytest.raises(ValueError, match="distance"):
        BalanceSection(levels=[4], distance="manhattan").validate()  # type: ignore[arg-type]
