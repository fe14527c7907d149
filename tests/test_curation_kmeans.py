"""Faiss k-means over vector shards: recovery of known blobs (checked against scikit-learn), training on
every point (a float64 numpy fixed-point check that faiss's default subsampling would fail), streamed
assignment against a numpy brute force, determinism, and the greedy k-means++ start (same picks as a
plain loop over the same random stream; D^2 frequencies over many seeds; wiring into faiss's Lloyd).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from components.curation.kmeans import (
    KMeansConfig,
    assign_clusters,
    kmeans_cost,
    kmeans_on_array,
    kmeans_plus_plus,
    sample_rows,
    train_kmeans,
)
from components.curation.knn_graph import InMemoryVectors


def sphere_blobs(sizes: list[int], dim: int, spread: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs around random unit centres, projected back onto the unit sphere: (N, D), labels (N,)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(sizes), dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    points = centres[labels] + spread * rng.standard_normal((labels.shape[0], dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), labels


def as_source(vectors: np.ndarray, shard_size: int = 64) -> InMemoryVectors:
    return InMemoryVectors([f"r{i}" for i in range(vectors.shape[0])], vectors, shard_size=shard_size)


def test_kmeans_recovers_separated_blobs_like_sklearn() -> None:
    points, truth = sphere_blobs([300, 250, 200, 150, 100], dim=16, spread=0.05, seed=1)
    cfg = KMeansConfig(n_clusters=5, n_iter=25, seed=3, n_redo=5)  # restarts: random init can merge two blobs
    centroids = train_kmeans(as_source(points), cfg)
    assert centroids.shape == (5, 16) and centroids.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)  # spherical: unit centroids
    labels, cosine = assign_clusters(as_source(points), centroids)
    reference = KMeans(n_clusters=5, n_init=10, random_state=0).fit_predict(points.astype(np.float64))
    assert adjusted_rand_score(truth, labels) == 1.0
    assert adjusted_rand_score(reference, labels) == 1.0
    assert cosine.min() > 0.5  # every point sits close to its own centre


def spherical_fixed_point_error(points: np.ndarray, centroids: np.ndarray) -> float:
    """Largest gap between each centroid and the normalised mean of ALL points assigned to it (float64)."""
    x, c = points.astype(np.float64), centroids.astype(np.float64)
    labels = np.argmax(x @ c.T, axis=1)
    means = np.stack([x[labels == j].sum(axis=0) for j in range(c.shape[0])])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return float(np.abs(means - c).max())


def test_training_uses_every_point_unless_told_otherwise() -> None:
    # Two broad blobs, 6000 points: faiss's default (256 per centroid) would train on 512 of them.
    points, _ = sphere_blobs([3000, 3000], dim=8, spread=0.6, seed=2)
    full = train_kmeans(as_source(points, 1000), KMeansConfig(n_clusters=2, n_iter=60, seed=0))
    assert spherical_fixed_point_error(points, full) < 1e-4  # a Lloyd fixed point of the whole set
    subsampled = train_kmeans(as_source(points, 1000),
                              KMeansConfig(n_clusters=2, n_iter=60, seed=0, max_points_per_centroid=256))
    assert spherical_fixed_point_error(points, subsampled) > 1e-3  # the same check catches a subsample


def test_max_train_rows_samples_seeded_uniform_rows() -> None:
    points, _ = sphere_blobs([500, 500], dim=8, spread=0.2, seed=4)
    source = as_source(points, 37)  # shard boundaries that do not divide the sample
    sample = sample_rows(source, 100, seed=5)
    expected_rows = np.sort(np.random.default_rng(5).choice(1000, size=100, replace=False))
    np.testing.assert_array_equal(sample, points[expected_rows])
    np.testing.assert_array_equal(sample_rows(source, 0, seed=5), points)
    cfg = KMeansConfig(n_clusters=2, seed=5, max_train_rows=100)
    np.testing.assert_array_equal(train_kmeans(source, cfg), train_kmeans(as_source(points, 1000), cfg))


def test_assignment_streams_and_matches_brute_force() -> None:
    points, _ = sphere_blobs([200, 200, 200], dim=12, spread=0.4, seed=6)
    centroids = train_kmeans(as_source(points), KMeansConfig(n_clusters=7, seed=1))
    small, _ = assign_clusters(as_source(points, 11), centroids, batch=5)
    labels, cosine = assign_clusters(as_source(points, 1000), centroids)
    np.testing.assert_array_equal(small, labels)
    scores = points.astype(np.float64) @ centroids.astype(np.float64).T  # (N, K)
    np.testing.assert_allclose(cosine, scores[np.arange(600), labels], atol=1e-5)
    np.testing.assert_allclose(cosine, scores.max(axis=1), atol=1e-5)  # the best centroid (ties aside)
    _, l2_dist = assign_clusters(as_source(points), centroids, spherical=False)
    squared = ((points[:, None, :].astype(np.float64) - centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_allclose(l2_dist, squared.min(axis=1), atol=1e-4)


def test_same_seed_same_result_and_seed_matters() -> None:
    points, _ = sphere_blobs([400, 300, 300], dim=8, spread=0.5, seed=7)
    cfg = KMeansConfig(n_clusters=6, seed=11)
    first, second = train_kmeans(as_source(points), cfg), train_kmeans(as_source(points), cfg)
    np.testing.assert_array_equal(first, second)
    other = train_kmeans(as_source(points), KMeansConfig(n_clusters=6, seed=12))
    assert not np.array_equal(first, other)


def test_plain_euclidean_kmeans_centroids_are_means() -> None:
    points, _ = sphere_blobs([300, 300], dim=6, spread=0.3, seed=8)
    centroids = train_kmeans(as_source(points), KMeansConfig(n_clusters=2, n_iter=50, spherical=False))
    labels, _ = assign_clusters(as_source(points), centroids, spherical=False)
    for j in range(2):
        np.testing.assert_allclose(centroids[j], points[labels == j].astype(np.float64).mean(axis=0), atol=1e-5)


@pytest.mark.parametrize("kwargs", [{"n_clusters": 0}, {"n_clusters": 2, "n_iter": 0},
                                    {"n_clusters": 2, "max_points_per_centroid": -1},
                                    {"n_clusters": 2, "max_train_rows": -5}, {"n_clusters": 2, "n_redo": 0}])
def test_invalid_config_is_refused(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        KMeansConfig(**kwargs).validate()  # type: ignore[arg-type]


def test_more_clusters_than_points_is_refused() -> None:
    points, _ = sphere_blobs([3], dim=4, spread=0.1, seed=0)
    with pytest.raises(ValueError, match="cannot make 5 clusters"):
        train_kmeans(as_source(points), KMeansConfig(n_clusters=5))


def test_given_initial_centroids_one_iteration_is_one_lloyd_step() -> None:
    points, _ = sphere_blobs([200, 200, 200], dim=8, spread=0.5, seed=9)
    init = points[[0, 250, 599]]  # (3, D)
    one_step = kmeans_on_array(points, 3, n_iter=1, seed=0, spherical=True, init=init)
    x = points.astype(np.float64)
    labels = np.argmax(x @ init.astype(np.float64).T, axis=1)
    means = np.stack([x[labels == j].sum(axis=0) for j in range(3)])
    np.testing.assert_allclose(one_step, means / np.linalg.norm(means, axis=1, keepdims=True), atol=1e-5)


def reference_kmeans_plus_plus(points: np.ndarray, n_clusters: int, seed: int, trials: int) -> list[int]:
    """Greedy k-means++ written out plainly: distances recomputed from scratch, one candidate at a time."""
    rng = np.random.default_rng(seed)
    x = points.astype(np.float64)
    centres = [int(rng.integers(x.shape[0]))]
    while len(centres) < n_clusters:
        nearest = np.array([min(float(((p - x[c]) ** 2).sum()) for c in centres) for p in x])  # (m,)
        cumulative = np.cumsum(nearest)
        candidates = [int(np.flatnonzero(cumulative > u * cumulative[-1])[0]) for u in rng.random(trials)]
        potentials = [np.minimum(nearest, ((x - x[c]) ** 2).sum(axis=1)).sum() for c in candidates]
        centres.append(candidates[int(np.argmin(potentials))])
    return centres


@pytest.mark.parametrize("trials", [1, 0])  # 0: the default 2 + int(ln K) candidates per centre
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_plus_plus_picks_what_a_plain_reference_loop_picks(seed: int, trials: int) -> None:
    points, _ = sphere_blobs([20, 15, 10, 5], dim=5, spread=0.4, seed=10 + seed)
    picks = kmeans_plus_plus(points, 8, seed=seed, n_local_trials=trials)
    assert picks.dtype == np.int64 and len(set(picks.tolist())) == 8  # distinct points
    expected = reference_kmeans_plus_plus(points, 8, seed, trials or 2 + int(np.log(8)))
    assert picks.tolist() == expected


def test_plain_kmeans_plus_plus_draws_the_second_centre_by_squared_distance() -> None:
    line = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [6.0, 0.0]], dtype=np.float32)  # (4, 2)
    draws = 4000
    counts = np.zeros((4, 4))
    for seed in range(draws):
        first, second = kmeans_plus_plus(line, 2, seed=seed, n_local_trials=1)
        counts[first, second] += 1
    squared = ((line[:, None, :] - line[None, :, :]) ** 2).sum(-1).astype(np.float64)  # (4, 4)
    expected = 0.25 * squared / squared.sum(axis=1, keepdims=True)  # uniform first pick, then D^2
    # Binomial standard error is below 0.007 for every cell at 4000 draws: 0.025 is more than 3.5 sigma.
    np.testing.assert_allclose(counts / draws, expected, atol=0.025)
    assert counts[np.arange(4), np.arange(4)].sum() == 0  # a centre is never drawn twice


def test_kmeans_plus_plus_start_feeds_lloyd_and_restarts_keep_the_cheapest() -> None:
    points, _ = sphere_blobs([150, 100, 50], dim=6, spread=0.6, seed=11)
    start = points[kmeans_plus_plus(points, 5, seed=4)]  # (5, D)
    from_pick = kmeans_on_array(points, 5, n_iter=3, seed=4, spherical=False, init="k-means++")
    np.testing.assert_array_equal(from_pick, kmeans_on_array(points, 5, n_iter=3, seed=4, spherical=False, init=start))
    singles = [kmeans_on_array(points, 5, n_iter=3, seed=4 + r, spherical=False, init="k-means++") for r in range(4)]
    costs = [kmeans_cost(points, c, spherical=False, use_gpu=False) for c in singles]
    best = kmeans_on_array(points, 5, n_iter=3, seed=4, spherical=False, init="k-means++", n_redo=4)
    np.testing.assert_array_equal(best, singles[int(np.argmin(costs))])
    assert len(set(costs)) > 1  # the restarts differ, so keeping the cheapest is a real choice
    with pytest.raises(ValueError, match="init must be"):
        kmeans_on_array(points, 5, n_iter=3, seed=4, spherical=False, init="kmeans")  # type: ignore[arg-type]
