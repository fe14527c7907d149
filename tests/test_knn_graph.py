"""The cluster-blocked IVF search, the pair dedup of k-NN edges and the vectorised components.

Every result is compared with an independent reference: faiss's exact IndexFlatIP (through the
``flat`` index kind), a numpy brute-force top-k, a dict of pairs, and a Python union-find / BFS.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from components.curation.blocked_ivf import build_blocked_ivf, self_knn, top_k_columns
from components.curation.knn_graph import (
    InMemoryVectors,
    KnnConfig,
    KnnEdges,
    cross_edges,
    knn_graph,
    resolve_kind,
    undirected,
)
from components.curation.union_find import UnionFind, connected_components


def clustered(n: int, dim: int, modes: int, spread: float, seed: int) -> np.ndarray:
    """(n, dim) unit vectors around ``modes`` random centres (no ties: continuous noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((modes, dim))
    x = centres[rng.integers(0, modes, n)] + spread * rng.standard_normal((n, dim))  # (n, dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def pair_set(edges: KnnEdges) -> set[tuple[int, int]]:
    return set(zip(edges.src.tolist(), edges.dst.tolist(), strict=True))


def brute_top_k(x: np.ndarray, k: int) -> np.ndarray:
    """(n, k) each row's k highest-cosine other rows (float64 scores)."""
    sims = x.astype(np.float64) @ x.T.astype(np.float64)  # (n, n)
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


# ------------------------------------------------------------------------------- blocked IVF search


def test_blocked_graph_probing_every_list_equals_the_exact_graph() -> None:
    x = clustered(1500, 24, modes=12, spread=0.6, seed=0)
    source = InMemoryVectors([f"r{i}" for i in range(len(x))], x, shard_size=400)
    exact = knn_graph(source, KnnConfig(k=10, threshold=0.5, index="flat"))
    blocked = knn_graph(source, KnnConfig(k=10, threshold=0.5, index="ivf_blocked", nlist=20, nprobe=20))
    assert exact.edges.num_edges > 1000
    np.testing.assert_array_equal(blocked.edges.src, exact.edges.src)
    np.testing.assert_array_equal(blocked.edges.dst, exact.edges.dst)
    np.testing.assert_allclose(blocked.edges.cosine, exact.edges.cosine, atol=1e-5)
    assert blocked.ids == exact.ids


def test_identical_rows_find_each_other_and_never_themselves() -> None:
    x = clustered(600, 16, modes=6, spread=0.5, seed=5)
    x[595:] = x[:5]  # self-exclusion must go by row number: a row ties with its copy
    index = build_blocked_ivf(InMemoryVectors([str(i) for i in range(len(x))], x), nlist=6, nprobe=2,
                              train_rows=600)
    rows = np.arange(len(x))
    neighbours, cosine = self_knn(index, 3, rows)
    assert (neighbours != rows[:, None]).all()
    assert neighbours[:5, 0].tolist() == list(range(595, 600)) and neighbours[595:, 0].tolist() == list(range(5))
    np.testing.assert_allclose(cosine[:5, 0], 1.0, atol=1e-6)


def test_blocked_lists_probing_every_list_are_the_brute_force_lists() -> None:
    x = clustered(800, 16, modes=8, spread=0.5, seed=1)
    index = build_blocked_ivf(InMemoryVectors([str(i) for i in range(len(x))], x), nlist=9, nprobe=9,
                              train_rows=800)
    rows = np.arange(len(x))
    neighbours, cosine = self_knn(index, 7, rows)  # (n, 7) each
    expected = brute_top_k(x, 7)
    assert (neighbours != rows[:, None]).all()  # never the row itself
    assert [set(r) for r in neighbours.tolist()] == [set(r) for r in expected.tolist()]
    assert (np.diff(cosine, axis=1) <= 0).all()  # best first


def test_blocked_search_with_few_probes_keeps_high_recall() -> None:
    x = clustered(3000, 32, modes=30, spread=0.35, seed=2)
    index = build_blocked_ivf(InMemoryVectors([str(i) for i in range(len(x))], x), nlist=30, nprobe=4,
                              train_rows=3000)
    neighbours, _ = self_knn(index, 10, np.arange(len(x)))
    expected = brute_top_k(x, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(neighbours.tolist(), expected.tolist(), strict=True)])
    assert recall >= 0.9
    sizes = np.diff(index.offsets)
    assert sizes.sum() == len(x) and sorted(index.members.tolist()) == list(range(len(x)))
    assert (index.probes[:, 0] == np.arange(index.nlist)).all()  # each list probes itself first


def test_blocked_cross_edges_probing_every_list_equal_flat_cross_edges() -> None:
    database = clustered(1200, 16, modes=10, spread=0.5, seed=3)
    queries = clustered(300, 16, modes=10, spread=0.5, seed=3)[:300] + 0.01  # near, not equal, to database rows
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    db = InMemoryVectors([str(i) for i in range(len(database))], database, shard_size=500)
    qs = InMemoryVectors([str(i) for i in range(len(queries))], queries, shard_size=100)
    flat = cross_edges(qs, db, KnnConfig(k=5, threshold=0.3, index="flat"))
    blocked = cross_edges(qs, db, KnnConfig(k=5, threshold=0.3, index="ivf_blocked", nlist=12, nprobe=12))
    assert flat.num_edges > 1000
    order_f, order_b = np.lexsort((flat.dst, flat.src)), np.lexsort((blocked.dst, blocked.src))
    np.testing.assert_array_equal(blocked.src[order_b], flat.src[order_f])
    np.testing.assert_array_equal(blocked.dst[order_b], flat.dst[order_f])
    np.testing.assert_allclose(blocked.cosine[order_b], flat.cosine[order_f], atol=1e-5)


@pytest.mark.parametrize("m", [100, 3000, 5003])
def test_top_k_columns_equals_a_full_sort(m: int) -> None:
    scores = torch.randn(37, m, generator=torch.Generator().manual_seed(m))
    values, columns = top_k_columns(scores, 65)
    reference = torch.sort(scores, dim=1, descending=True)
    torch.testing.assert_close(values, reference.values[:, :65])
    torch.testing.assert_close(torch.gather(scores, 1, columns), values)


def test_auto_uses_the_blocked_index_only_for_large_self_joins() -> None:
    assert resolve_kind("auto", 10, ivf_min_rows=100, self_join=True) == "flat"
    assert resolve_kind("auto", 100, ivf_min_rows=100, self_join=True) == "ivf_blocked"
    assert resolve_kind("auto", 100, ivf_min_rows=100) == "ivf"
    KnnConfig(index="ivf_blocked").validate()
    with pytest.raises(ValueError):
        KnnConfig(index="hnsw").validate()  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- pairs and components


def test_undirected_keeps_each_pair_once_with_its_larger_cosine() -> None:
    rng = np.random.default_rng(4)
    src, dst = rng.integers(0, 50, 2000), rng.integers(0, 50, 2000)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    cosine = rng.uniform(0.0, 1.0, src.shape[0]).astype(np.float32)
    best: dict[tuple[int, int], float] = {}
    for a, b, c in zip(src.tolist(), dst.tolist(), cosine.tolist(), strict=True):
        pair = (min(a, b), max(a, b))
        best[pair] = max(best.get(pair, -1.0), c)
    result = undirected(KnnEdges(src, dst, cosine))
    assert list(zip(result.src.tolist(), result.dst.tolist(), strict=True)) == sorted(best)
    np.testing.assert_array_equal(result.cosine, np.array([best[p] for p in sorted(best)], np.float32))
    assert result.src.dtype == np.int64 and result.dst.dtype == np.int64


def bfs_labels(n: int, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Reference: breadth-first search from each unvisited node in ascending order."""
    adjacent: list[list[int]] = [[] for _ in range(n)]
    for a, b in zip(src.tolist(), dst.tolist(), strict=True):
        adjacent[a].append(b)
        adjacent[b].append(a)
    labels = np.full(n, -1, np.int64)
    for start in range(n):
        if labels[start] >= 0:
            continue
        labels[start] = start
        queue = deque([start])
        while queue:
            for other in adjacent[queue.popleft()]:
                if labels[other] < 0:
                    labels[other] = start
                    queue.append(other)
    return labels


@pytest.mark.parametrize(("n", "edges", "seed"), [(1, 0, 0), (30, 10, 1), (500, 300, 2), (500, 2000, 3),
                                                   (2000, 1500, 4)])
def test_components_equal_bfs_and_union_find(n: int, edges: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    src, dst = rng.integers(0, n, edges), rng.integers(0, n, edges)  # self loops and repeats included
    src, dst = np.concatenate([src, src[:edges // 4]]), np.concatenate([dst, dst[:edges // 4]])
    labels = connected_components(n, src, dst)
    np.testing.assert_array_equal(labels, bfs_labels(n, src, dst))
    sets = UnionFind(n)
    for a, b in zip(src.tolist(), dst.tolist(), strict=True):
        sets.union(a, b)
    for a, b in zip(range(n), rng.integers(0, n, n).tolist(), strict=True):
        assert (labels[a] == labels[b]) == (sets.find(a) == sets.find(b))
    assert labels.dtype == np.int64


def test_components_of_no_nodes_and_no_edges() -> None:
    assert connected_components(0, np.zeros(0, np.int64), np.zeros(0, np.int64)).shape == (0,)
    np.testing.assert_array_equal(connected_components(4, np.zeros(0, np.int64), np.zeros(0, np.int64)),
                                  np.arange(4))
