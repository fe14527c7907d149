"""Cluster-blocked IVF k-NN search: each coarse list's members are queried together with one matmul.

Faiss's IndexIVFFlat scans lists query by query with vector instructions but no BLAS, so a
self-join of 1M rows x 4,000 probed rows each spends its time waiting on memory (30 minutes on two
cores). Here every row is assigned to its nearest of ``nlist`` spherical k-means centroids; the
members of list c are then searched together against the members of the ``nprobe`` lists whose
centroids are nearest to centroid c (c itself first), as one (q, D) x (D, m) matmul followed by a
per-row top-k. The matmul runs at BLAS speed and each candidate row is read once per block, not
once per query.

The probe set belongs to the query's list, not to the query: a query near the edge of its list
sees the lists nearest its centroid, which can miss a list nearer to the query itself. That is the
price of batching; ``nprobe`` buys the recall back (measured in benchmarks/curation_scale.py).
With ``nprobe == nlist`` every row is a candidate of every query and the search is exact.

Vectors are held in RAM as one float32 (N, D) matrix in the source's row order (N x D x 4 bytes),
so the cosines are float32 dot products like those of a flat index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from components.curation.knn_graph import KnnEdges, VectorSource, empty_edges, training_sample

DEFAULT_TRAIN_PER_LIST = 64  # k-means sample rows per list (faiss warns below 39)
ASSIGN_ROWS = 65_536  # rows per centroid matmul while assigning: bounds the (rows, nlist) scores
MAX_BLOCK_SCORES = 1 << 24  # query rows x candidate rows per matmul: a (q, m) float32 block <= 64 MiB
SELECT_CHUNK = 16  # top-k via chunk maxima: columns per chunk (see top_k_columns)


@dataclass(frozen=True)
class BlockedIvf:
    """Rows grouped by their nearest centroid, and the lists each list's members probe."""

    vectors: torch.Tensor  # (N, D) float32, source row order
    centroids: torch.Tensor  # (nlist, D) float32 unit rows
    members: np.ndarray  # (N,) int64: row numbers sorted by list (stable: ascending within a list)
    offsets: np.ndarray  # (nlist + 1,) int64: list c holds members[offsets[c]:offsets[c + 1]]
    probes: np.ndarray  # (nlist, nprobe) int64: lists searched by list c's members, c first

    @property
    def nlist(self) -> int:
        return int(self.probes.shape[0])

    def list_rows(self, lst: int) -> np.ndarray:
        return self.members[self.offsets[lst]:self.offsets[lst + 1]]  # (n_c,)

    def candidates(self, lst: int) -> np.ndarray:
        """Row numbers searched by list ``lst``'s members: its own rows first, then the other probes'."""
        return np.concatenate([self.list_rows(int(p)) for p in self.probes[lst]])  # (m,)


def default_blocked_nlist(n: int) -> int:
    """About 2 * sqrt(N) lists: assignment costs N x nlist and the search N^2 x nprobe / nlist
    dot products, so the total is smallest for nlist near sqrt(N x nprobe)."""
    return max(1, min(n, int(2 * math.sqrt(n))))


def spherical_centroids(sample: np.ndarray, nlist: int, n_iter: int, seed: int) -> np.ndarray:
    """(nlist, D) unit centroids of spherical k-means on ``sample`` (every sample row used)."""
    kmeans = faiss.Kmeans(sample.shape[1], nlist, niter=n_iter, spherical=True, seed=seed,
                          max_points_per_centroid=max(1, math.ceil(sample.shape[0] / nlist)))
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def nearest_list(vectors: torch.Tensor, centroids: torch.Tensor) -> np.ndarray:
    """Index (n,) of each row's highest-cosine centroid, ``ASSIGN_ROWS`` rows per matmul."""
    parts = [torch.argmax(vectors[s:s + ASSIGN_ROWS] @ centroids.T, dim=1)  # (rows, nlist) -> (rows,)
             for s in range(0, vectors.shape[0], ASSIGN_ROWS)]
    return torch.cat(parts).numpy().astype(np.int64) if parts else np.zeros(0, np.int64)


def load_vectors(source: VectorSource) -> torch.Tensor:
    """The whole source as one float32 (N, D) tensor, filled shard by shard."""
    out = torch.empty((source.num_rows, source.dim), dtype=torch.float32)
    view = out.numpy()  # shares memory: numpy copies (and casts) a read-only memory-mapped shard into it
    base = 0
    for _, shard in source.iter_shards():
        view[base:base + shard.shape[0]] = shard
        base += shard.shape[0]
    return out


def probe_lists(centroids: np.ndarray, nprobe: int) -> np.ndarray:
    """(nlist, nprobe) for each list: itself, then the lists of the most similar other centroids."""
    sims = torch.from_numpy(centroids) @ torch.from_numpy(centroids).T  # (nlist, nlist)
    sims.fill_diagonal_(math.inf)  # a list always probes itself, even if another centroid is identical
    return torch.topk(sims, nprobe, dim=1).indices.numpy().astype(np.int64)


def build_blocked_ivf(source: VectorSource, nlist: int, nprobe: int, train_rows: int, n_iter: int = 10,
                      seed: int = 0) -> BlockedIvf:
    """Centroids trained on a strided sample of ``train_rows``, then every row loaded and assigned."""
    nlist = max(1, min(nlist, source.num_rows))
    centroids = spherical_centroids(training_sample(source, max(train_rows, nlist)), nlist, n_iter, seed)
    vectors = load_vectors(source)
    lists = nearest_list(vectors, torch.from_numpy(centroids))  # (N,)
    members = np.argsort(lists, kind="stable")  # (N,) grouped by list, rows ascending within each
    offsets = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=nlist))]).astype(np.int64)
    return BlockedIvf(vectors, torch.from_numpy(centroids), members, offsets,
                      probe_lists(centroids, min(nprobe, nlist)))


def top_k_columns(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries per row of (q, m) scores and their columns, both (q, k), best first.

    The k best entries of a row lie within its k chunks of ``SELECT_CHUNK`` columns with the largest
    maxima (any other chunk is beaten entirely by k chunk maxima), so the full top-k only runs over
    k x SELECT_CHUNK columns: about 1.5x faster than topk over all m for m of a few thousand.
    """
    q, m = scores.shape
    if m < 3 * k * SELECT_CHUNK:  # too few chunks to skip most of them
        return torch.topk(scores, k, dim=1)
    pad = (-m) % SELECT_CHUNK
    padded = torch.nn.functional.pad(scores, (0, pad), value=-math.inf) if pad else scores  # (q, m')
    chunk_max = padded.view(q, -1, SELECT_CHUNK).amax(dim=2)  # (q, m' / SELECT_CHUNK)
    chunks = torch.topk(chunk_max, k, dim=1, sorted=False).indices  # (q, k)
    columns = (chunks[:, :, None] * SELECT_CHUNK + torch.arange(SELECT_CHUNK)).reshape(q, -1)  # (q, k * CHUNK)
    values, picked = torch.topk(torch.gather(padded, 1, columns), k, dim=1)  # (q, k) each
    return values, torch.gather(columns, 1, picked)


@dataclass(frozen=True)
class BlockResult:
    rows: np.ndarray  # (q,) int64 query rows
    neighbours: np.ndarray  # (q, k) int64 database rows, best first
    cosine: np.ndarray  # (q, k) float32


def search_block(index: BlockedIvf, lst: int, query_rows: np.ndarray, queries: torch.Tensor, k: int,
                 exclude_self: bool) -> Iterator[BlockResult]:
    """Top-k of ``queries`` (q, D), all assigned to list ``lst``, over the rows ``lst`` probes.

    With ``exclude_self`` the queries are database rows of list ``lst`` and each one's own column is
    masked out (by row number, not by score: identical vectors may tie with it).
    """
    candidates = index.candidates(lst)  # (m,)
    k_eff = min(k, candidates.shape[0] - (1 if exclude_self else 0))
    if k_eff < 1 or query_rows.shape[0] == 0:
        return
    database = index.vectors[torch.from_numpy(candidates)]  # (m, D)
    step = max(1, MAX_BLOCK_SCORES // candidates.shape[0])
    for start in range(0, query_rows.shape[0], step):
        rows = query_rows[start:start + step]  # (q,)
        scores = queries[start:start + step] @ database.T  # (q, m)
        if exclude_self:  # own rows come first among the candidates, so a row's column is its list position
            own = np.searchsorted(index.list_rows(lst), rows)  # (q,)
            scores[torch.arange(rows.shape[0]), torch.from_numpy(own)] = -math.inf
        values, columns = top_k_columns(scores, k_eff)  # (q, k_eff) each
        yield BlockResult(rows, candidates[columns.numpy()], values.numpy())


def self_blocks(index: BlockedIvf, k: int, rows: np.ndarray | None = None) -> Iterator[BlockResult]:
    """Each database row's top-k other rows, list by list (only ``rows``, ascending, when given)."""
    for lst in range(index.nlist):
        members = index.list_rows(lst)
        if rows is not None:
            members = members[np.isin(members, rows, assume_unique=True)]
        if members.shape[0]:
            yield from search_block(index, lst, members, index.vectors[torch.from_numpy(members)], k, True)


def cross_blocks(index: BlockedIvf, queries: torch.Tensor, centroid_of: np.ndarray, k: int) -> Iterator[BlockResult]:
    """Top-k database rows of each external query (n_q, D), queries grouped by their nearest list."""
    order = np.argsort(centroid_of, kind="stable")
    bounds = np.concatenate([[0], np.cumsum(np.bincount(centroid_of, minlength=index.nlist))])
    for lst in range(index.nlist):
        rows = order[bounds[lst]:bounds[lst + 1]]
        if rows.shape[0]:
            yield from search_block(index, lst, rows, queries[torch.from_numpy(rows)], k, False)


@dataclass
class EdgeParts:
    """Thresholded edges collected block by block; int32 row numbers (N < 2^31) halve their memory."""

    src: list[np.ndarray]
    dst: list[np.ndarray]
    cosine: list[np.ndarray]

    def concatenate(self) -> KnnEdges:
        """One KnnEdges (src/dst int32: the caller's pair dedup widens them), emptying the parts."""
        if not self.src:
            return empty_edges()
        edges = KnnEdges(np.concatenate(self.src), np.concatenate(self.dst), np.concatenate(self.cosine))
        for part in (self.src, self.dst, self.cosine):
            part.clear()
        return edges


def thresholded(blocks: Iterator[BlockResult], threshold: float) -> EdgeParts:
    """Edges query row -> neighbour with cosine > threshold, per block."""
    parts = EdgeParts([], [], [])
    for block in blocks:
        keep = block.cosine > threshold  # (q, k)
        parts.src.append(np.broadcast_to(block.rows[:, None], keep.shape)[keep].astype(np.int32))
        parts.dst.append(block.neighbours[keep].astype(np.int32))
        parts.cosine.append(block.cosine[keep].astype(np.float32))
    return parts


def self_knn(index: BlockedIvf, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(neighbours, cosine), each (len(rows), k), for the given database rows: the graph's own lists.

    Rows are answered in ascending order; a row with fewer than k candidates is padded with -1 / -inf.
    """
    wanted = np.unique(rows)
    neighbours = np.full((wanted.shape[0], k), -1, np.int64)
    cosine = np.full((wanted.shape[0], k), -np.inf, np.float32)
    for block in self_blocks(index, k, wanted):
        at = np.searchsorted(wanted, block.rows)
        neighbours[at, :block.neighbours.shape[1]] = block.neighbours
        cosine[at, :block.cosine.shape[1]] = block.cosine
    return neighbours, cosine


def blocked_self_edges(source: VectorSource, nlist: int, nprobe: int, train_rows: int, k: int,
                       threshold: float) -> KnnEdges:
    """Directed edges of each row to its k nearest others with cosine > threshold. The index (the
    (N, D) vectors) is freed before the edges are concatenated, so the two never peak together."""
    index = build_blocked_ivf(source, nlist, nprobe, train_rows)
    parts = thresholded(self_blocks(index, k), threshold)
    del index
    return parts.concatenate()


def blocked_cross_edges(database: VectorSource, queries: VectorSource, nlist: int, nprobe: int, train_rows: int,
                        k: int, threshold: float) -> KnnEdges:
    """Edges external query row -> database row; the queries (an eval set: small) are held in RAM."""
    index = build_blocked_ivf(database, nlist, nprobe, train_rows)
    vectors = load_vectors(queries)
    parts = thresholded(cross_blocks(index, vectors, nearest_list(vectors, index.centroids), k), threshold)
    del index, vectors
    edges = parts.concatenate()
    return KnnEdges(edges.src.astype(np.int64), edges.dst.astype(np.int64), edges.cosine)
