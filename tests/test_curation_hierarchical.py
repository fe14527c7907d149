"""Hierarchical k-means with resampling and balanced sampling (Vo et al. 2024): a consistent tree over known
nested blobs, water-filling budgets against a brute-force reference, and balanced vs uniform sampling on a
mixture where one concept is 50x larger than the others.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from components.curation.hierarchical import (
    HierarchicalClustering,
    HierarchicalKMeansConfig,
    balanced_sample,
    fair_split,
    hierarchical_kmeans,
)
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
    cfg = HierarchicalKMeansConfig(levels=[20, 4], n_iter=20, resampling_steps=2, resample_per_cluster=10, seed=1)
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
    assert tree.point_similarity is not None
    np.testing.assert_allclose(tree.point_similarity,
                               np.einsum("nd,nd->n", x, tree.centroids[0][tree.assignments[0]]), atol=1e-5)


def test_same_seed_same_tree() -> None:
    x, _ = nested_blobs(groups=3, per_group=4, size=30, dim=12, seed=2)
    cfg = HierarchicalKMeansConfig(levels=[12, 3], resampling_steps=3, seed=5, max_train_rows=300)
    first, second = hierarchical_kmeans(source_of(x), cfg), hierarchical_kmeans(source_of(x, 7), cfg)
    for a, b in zip(first.assignments + first.centroids, second.assignments + second.centroids, strict=True):
        np.testing.assert_array_equal(a, b)


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
