"""Retrieval-based curation (DINOv2 §3): sample-based retrieval against a float64 numpy brute force,
cluster-based retrieval on known blobs, the IVF path against the streamed exact one, and real
Fashion-MNIST pixels where seeds of one class retrieve mostly that class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from components.curation.knn_graph import InMemoryVectors, KnnConfig
from components.curation.retrieval import RetrievalConfig, retrieve
from components.data import fashion_mnist

DIM = 16


def blob_points(centre: np.ndarray, n: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    x = centre + spread * rng.standard_normal((n, centre.shape[0]))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def vectors(x: np.ndarray, prefix: str, shard_size: int = 50) -> InMemoryVectors:
    return InMemoryVectors([f"{prefix}{i}" for i in range(x.shape[0])], x, shard_size=shard_size)


@pytest.fixture(scope="module")
def pool_and_seeds() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pool: blobs A, B, C (distractor), D of 200 points each; seeds: 6 fresh points of A, 2 of B."""
    rng = np.random.default_rng(0)
    centres = np.eye(DIM)[:4]
    pool = np.concatenate([blob_points(c, 200, 0.15, rng) for c in centres])
    pool_blob = np.repeat(np.arange(4), 200)
    seeds = np.concatenate([blob_points(centres[0], 6, 0.15, rng), blob_points(centres[1], 2, 0.15, rng)])
    seed_blob = np.array([0] * 6 + [1] * 2)
    return pool, pool_blob, seeds, seed_blob


def reference_top_n(pool: np.ndarray, seeds: np.ndarray, n: int, min_similarity: float) -> dict[int, set[int]]:
    """Per seed: its n most similar pool rows (float64, ties to the lower row) with cosine >= min_similarity."""
    scores = seeds.astype(np.float64) @ pool.astype(np.float64).T  # (S, N)
    found = {}
    for s in range(seeds.shape[0]):
        order = np.lexsort((np.arange(pool.shape[0]), -scores[s]))[:n]
        found[s] = {int(r) for r in order if scores[s, r] >= min_similarity}
    return found


def test_sample_based_matches_brute_force_and_never_reaches_the_distractor(
        pool_and_seeds: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
    pool, pool_blob, seeds, _ = pool_and_seeds
    cfg = RetrievalConfig(mode="sample", n_per_seed=3)
    result = retrieve(vectors(pool, "p", 37), vectors(seeds, "s"), cfg)
    expected = reference_top_n(pool, seeds, 3, 0.0)
    assert set(result.rows.tolist()) == set().union(*expected.values())
    assert set(pool_blob[result.rows].tolist()) == {0, 1}  # never C or D
    assert len(result.rows) <= 3 * seeds.shape[0]
    assert np.all(np.diff(result.rows) > 0) and result.rows.dtype == np.int64
    np.testing.assert_array_equal(result.by["sample"], result.rows)
    for row, seed_id in result.seed_of.items():  # credited to a seed that had it in its top 3
        assert row in expected[int(seed_id[1:])]
    assert set(result.seed_of) == set(result.rows.tolist())
    assert result.stats["seeds"] == 8 and result.stats["retrieved_sample"] == len(result.rows)
    same = retrieve(vectors(pool, "p", 1000), vectors(seeds, "s", 3), cfg)  # other shard boundaries
    np.testing.assert_array_equal(same.rows, result.rows)
    assert same.seed_of == result.seed_of


def test_min_similarity_drops_far_neighbours(
        pool_and_seeds: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
    pool, _, seeds, _ = pool_and_seeds
    scores = seeds.astype(np.float64) @ pool.astype(np.float64).T
    cutoff = float(np.median(np.sort(scores, axis=1)[:, -20:]))  # keeps some of each seed's top 20, not all
    result = retrieve(vectors(pool, "p"), vectors(seeds, "s"), RetrievalConfig(n_per_seed=20, min_similarity=cutoff))
    expected = set().union(*reference_top_n(pool, seeds, 20, cutoff).values())
    assert set(result.rows.tolist()) == expected
    assert 0 < len(expected) < len(set().union(*reference_top_n(pool, seeds, 20, -1.0).values()))


def test_ivf_index_with_every_list_probed_equals_the_streamed_search(
        pool_and_seeds: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
    pool, _, seeds, _ = pool_and_seeds
    streamed = retrieve(vectors(pool, "p"), vectors(seeds, "s"), RetrievalConfig(n_per_seed=5))
    ivf = RetrievalConfig(n_per_seed=5, knn=KnnConfig(index="ivf", nlist=8, nprobe=8, use_gpu=False))
    indexed = retrieve(vectors(pool, "p"), vectors(seeds, "s"), ivf)
    np.testing.assert_array_equal(indexed.rows, streamed.rows)


def test_cluster_based_takes_only_clusters_with_enough_seeds_and_caps_them(
        pool_and_seeds: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
    pool, pool_blob, seeds, _ = pool_and_seeds
    cfg = RetrievalConfig(mode="cluster", n_clusters=4, min_seeds_per_cluster=4, max_per_cluster=50, seed=1)
    result = retrieve(vectors(pool, "p"), vectors(seeds, "s"), cfg)
    assert result.stats["qualifying_clusters"] == 1  # A has 6 seeds, B only 2
    assert len(result.rows) == 50 and set(pool_blob[result.rows].tolist()) == {0}
    np.testing.assert_array_equal(result.rows, retrieve(vectors(pool, "p"), vectors(seeds, "s"), cfg).rows)
    uncapped = retrieve(vectors(pool, "p"), vectors(seeds, "s"),
                        RetrievalConfig(mode="cluster", n_clusters=4, min_seeds_per_cluster=2, max_per_cluster=10_000))
    assert uncapped.stats["qualifying_clusters"] == 2
    np.testing.assert_array_equal(uncapped.rows, np.flatnonzero(pool_blob <= 1))  # all of A and B
    assert result.seed_of == {}


def test_both_is_the_union(pool_and_seeds: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
    pool, _, seeds, _ = pool_and_seeds
    cfg = RetrievalConfig(mode="both", n_per_seed=4, n_clusters=4, min_seeds_per_cluster=4, max_per_cluster=30)
    result = retrieve(vectors(pool, "p"), vectors(seeds, "s"), cfg)
    np.testing.assert_array_equal(result.rows, np.union1d(result.by["sample"], result.by["cluster"]))
    assert len(result.by["sample"]) > 0 and len(result.by["cluster"]) == 30
    assert result.stats["union"] == len(result.rows) >= max(len(rows) for rows in result.by.values())


@pytest.mark.parametrize("kwargs", [{"mode": "nearest"}, {"n_per_seed": 0}, {"min_similarity": 1.5},
                                    {"max_per_cluster": 0}, {"knn": KnnConfig(k=0)}])
def test_invalid_config_is_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetrievalConfig(**kwargs).validate()  # type: ignore[arg-type]


def test_fashion_mnist_seeds_of_a_class_retrieve_that_class(tmp_path: Path) -> None:
    folder = fashion_mnist.locate(fashion_mnist.INSTALLED_DATA_DIR, tmp_path / "cache")
    test = fashion_mnist.load_split(folder, "test")
    pixels = test.images.reshape(len(test.images), -1).astype(np.float32)
    pixels -= pixels.mean(axis=0)  # centred pixels: cosine then compares shapes, not overall brightness
    unit = pixels / np.linalg.norm(pixels, axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    pool_rows = rng.permutation(len(unit))
    seed_rows, pool_rows = pool_rows[:200], pool_rows[200:]  # seeds are held out of the pool
    pool = vectors(unit[pool_rows], "f", 2048)
    for cls in (1, 7, 9):  # trouser, sneaker, ankle boot; a random pick would be about 10% right
        chosen = seed_rows[test.labels[seed_rows] == cls]
        result = retrieve(pool, vectors(unit[chosen], "s"), RetrievalConfig(n_per_seed=4))
        precision = float(np.mean(test.labels[pool_rows[result.rows]] == cls))
        assert len(result.rows) >= 2 * len(chosen) and precision >= 0.85, (cls, precision)
