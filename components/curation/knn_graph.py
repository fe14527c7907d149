"""Cosine k-NN graphs over embedding shards with Faiss (the copy-detection graph of DINOv2 appendix A).

Vectors are L2-normalised, so an inner-product index gives cosine similarity. The database is added
to the index shard by shard and queries are searched shard by shard (in ``query_batch`` slices), so
apart from the index itself only one shard is in memory. ``flat`` (IndexFlatIP) is exact; ``ivf``
(IndexIVFFlat, trained explicitly on a strided sample) is approximate unless ``nprobe == nlist``.
``ivf_blocked`` (components/curation/blocked_ivf.py) is an IVF whose self-join runs list by list as
matmuls: the one to use for the k-NN graph of a large pool (docs/curation.md, "Scale").
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, get_args

import faiss
import numpy as np

IndexKind = Literal["auto", "flat", "ivf", "ivf_blocked"]
INDEX_KINDS: tuple[str, ...] = get_args(IndexKind)
DEFAULT_IVF_MIN_ROWS = 1_000_000  # "auto": exact search below this many database rows, IVF above
DEFAULT_BLOCKED_NPROBE = 10  # recall@64 0.95-0.96 on the 1M benchmark pool (docs/curation.md, "Scale")
DEFAULT_TRAIN_ROWS = 262_144  # k-means sample for IVF training (faiss wants >= 39 points per list)


class VectorSource(Protocol):
    """Anything that streams (ids, unit vectors (n, D)) shard by shard: EmbeddingShards, InMemoryVectors."""

    @property
    def dim(self) -> int: ...

    @property
    def num_rows(self) -> int: ...

    def iter_shards(self, mmap: bool = True) -> Iterator[tuple[list[str], np.ndarray]]: ...

    def ids(self) -> list[str]: ...


@dataclass(frozen=True)
class InMemoryVectors:
    """Precomputed vectors (N, D) served as shards of ``shard_size`` rows (tests, small eval sets)."""

    id_list: Sequence[str]
    vectors: np.ndarray  # (N, D) float32, rows L2-normalised by the caller
    shard_size: int = 65_536

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.vectors.shape[0])

    def iter_shards(self, mmap: bool = True) -> Iterator[tuple[list[str], np.ndarray]]:
        for start in range(0, self.num_rows, self.shard_size):
            yield list(self.id_list[start:start + self.shard_size]), self.vectors[start:start + self.shard_size]

    def ids(self) -> list[str]:
        return list(self.id_list)


@dataclass(frozen=True)
class KnnEdges:
    """Directed edges query row -> database row with cosine > threshold (global row numbers)."""

    src: np.ndarray  # (E,) int64
    dst: np.ndarray  # (E,) int64
    cosine: np.ndarray  # (E,) float32

    @property
    def num_edges(self) -> int:
        return int(self.src.shape[0])


@dataclass(frozen=True)
class KnnGraph:
    """Undirected thresholded k-NN graph: each pair once with src < dst; ``ids[row]`` names a row."""

    edges: KnnEdges
    ids: list[str]

    @property
    def num_nodes(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class KnnConfig:
    k: int = 64
    threshold: float = 0.6  # keep edges with cosine strictly above this
    index: IndexKind = "flat"
    nlist: int | None = None  # IVF lists; None: about 4 * sqrt(N) (ivf), 2 * sqrt(N) (ivf_blocked)
    nprobe: int | None = None  # IVF lists probed per query (ivf) or per list (ivf_blocked); None: 16, capped at nlist
    ivf_min_rows: int = DEFAULT_IVF_MIN_ROWS
    use_gpu: bool | None = None  # None: when faiss sees a GPU
    query_batch: int = 8192  # query rows per faiss call: bounds the (q, k) result arrays

    def validate(self) -> None:
        if self.k < 1 or self.query_batch < 1 or self.ivf_min_rows < 1:
            raise ValueError("k, query_batch and ivf_min_rows must be >= 1")
        if self.index not in INDEX_KINDS:
            raise ValueError(f"index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
        if (self.nlist is not None and self.nlist < 1) or (self.nprobe is not None and self.nprobe < 1):
            raise ValueError("nlist and nprobe must be >= 1")


def empty_edges() -> KnnEdges:
    return KnnEdges(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))


def gpu_count() -> int:
    get = getattr(faiss, "get_num_gpus", None)  # absent from some faiss-cpu builds
    return int(get()) if get is not None else 0


def resolve_kind(kind: IndexKind, n: int, ivf_min_rows: int,
                 self_join: bool = False) -> Literal["flat", "ivf", "ivf_blocked"]:
    """The index a search uses. "auto" on a large database: the blocked IVF for a self-join (every
    row is a query, so batching queries by list pays), faiss's IVF when few outside queries come."""
    if kind == "auto":
        if n < ivf_min_rows:
            return "flat"
        return "ivf_blocked" if self_join else "ivf"
    return kind


def default_nlist(n: int) -> int:
    return max(1, min(n, int(4 * math.sqrt(n))))


def training_sample(source: VectorSource, max_rows: int) -> np.ndarray:
    """Every ``stride``-th global row, streamed shard by shard: (<= max_rows, D) covering the whole pool."""
    stride = max(1, math.ceil(source.num_rows / max_rows))
    parts, base = [], 0
    for _, vectors in source.iter_shards():
        first = (-base) % stride  # the first row of this shard whose global number is a multiple of stride
        parts.append(np.asarray(vectors[first::stride], dtype=np.float32))
        base += vectors.shape[0]
    return np.ascontiguousarray(np.concatenate(parts))  # (m, D)


@dataclass(frozen=True)
class SearchIndex:
    index: Any  # a filled faiss inner-product index
    keep_alive: tuple[Any, ...] = ()  # GPU resources: must outlive the index (faiss objects refuse new attributes)


def build_index(database: VectorSource, cfg: KnnConfig) -> SearchIndex:
    """A filled inner-product index over ``database`` (on the GPU when asked or available)."""
    n, dim = database.num_rows, database.dim
    kind = resolve_kind(cfg.index, n, cfg.ivf_min_rows)
    if kind == "ivf_blocked":
        raise ValueError("ivf_blocked is not a faiss index: use knn_graph / cross_edges")
    index: Any
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = min(cfg.nlist or default_nlist(n), n)  # k-means cannot make more centroids than points
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(training_sample(database, max(DEFAULT_TRAIN_ROWS, 39 * nlist)))
        index.nprobe = min(cfg.nprobe or 16, nlist)
    for _, vectors in database.iter_shards():
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    use_gpu = gpu_count() > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu:
        resources = faiss.StandardGpuResources()
        return SearchIndex(faiss.index_cpu_to_gpu(resources, 0, index), (resources,))  # nprobe is copied over
    return SearchIndex(index)


def search_edges(index: Any, queries: VectorSource, k: int, threshold: float, exclude_self: bool,
                 query_batch: int) -> KnnEdges:
    """Edges from each query row to its top-k database rows with cosine > threshold.

    With ``exclude_self`` queries and database are the same rows: one extra neighbour is searched and
    the row itself dropped (by row number, not rank: identical vectors may tie with it).
    """
    n_db = int(index.ntotal)
    k_search = min(k + 1 if exclude_self else k, n_db)
    if k_search < 1:
        return empty_edges()
    src_parts, dst_parts, cos_parts = [], [], []
    base = 0
    for _, vectors in queries.iter_shards():
        for start in range(0, vectors.shape[0], query_batch):
            chunk = np.ascontiguousarray(vectors[start:start + query_batch], dtype=np.float32)  # (q, D)
            cosine, neighbours = index.search(chunk, k_search)  # (q, k_search) each, best first
            rows = np.arange(base + start, base + start + chunk.shape[0], dtype=np.int64)[:, None]  # (q, 1)
            valid = neighbours >= 0  # IVF returns -1 when the probed lists hold fewer than k rows
            if exclude_self:
                valid &= neighbours != rows
                valid &= np.cumsum(valid, axis=1) <= k  # at most k others per row
            valid &= cosine > threshold
            src_parts.append(np.broadcast_to(rows, neighbours.shape)[valid])
            dst_parts.append(neighbours[valid].astype(np.int64))
            cos_parts.append(cosine[valid].astype(np.float32))
        base += vectors.shape[0]
    if not src_parts:
        return empty_edges()
    return KnnEdges(np.concatenate(src_parts), np.concatenate(dst_parts), np.concatenate(cos_parts))


PAIR_BUCKET_EDGES = 1 << 24  # edges sorted at once by undirected(): bounds its temporaries to ~0.5 GB


def undirected(edges: KnnEdges) -> KnnEdges:
    """Each unordered pair once, as (min, max) with the larger of its two cosines, sorted by (src, dst).

    Both copies of a pair share their smaller end, so pairs are deduplicated in buckets of that end
    (about PAIR_BUCKET_EDGES edges each), with one int64 key (lo * n + hi) argsorted per bucket: a
    three-key lexsort of all ~100M edges of a 2M-row graph would hold several E-sized temporaries.
    """
    if edges.num_edges == 0:
        return empty_edges()
    n = int(max(edges.src.max(), edges.dst.max())) + 1
    lo = np.minimum(edges.src, edges.dst)  # (E,) in the input's integer type
    n_buckets = -(-edges.num_edges // PAIR_BUCKET_EDGES)
    bounds = np.linspace(0, n, n_buckets + 1).astype(np.int64)
    src_parts, dst_parts, cos_parts = [], [], []
    for low, high in itertools.pairwise(bounds):
        picked = np.flatnonzero((lo >= low) & (lo < high))  # (E_b,)
        key = lo[picked].astype(np.int64) * n + np.maximum(edges.src[picked], edges.dst[picked])  # n^2 < 2^63
        order = np.argsort(key)
        key, cosine = key[order], edges.cosine[picked][order]
        starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if key.shape[0] else key[:0]
        src_parts.append(key[starts] // n)
        dst_parts.append(key[starts] % n)
        cos_parts.append(np.maximum.reduceat(cosine, starts).astype(np.float32) if starts.shape[0] else cosine)
    return KnnEdges(np.concatenate(src_parts), np.concatenate(dst_parts), np.concatenate(cos_parts))


def build_knn_graph(shards: VectorSource, k: int, threshold: float, index: IndexKind = "flat",
                    nlist: int | None = None, nprobe: int | None = None, *,
                    ivf_min_rows: int = DEFAULT_IVF_MIN_ROWS, use_gpu: bool | None = None,
                    query_batch: int = 8192) -> KnnGraph:
    """The undirected graph joining each row to those of its k nearest others with cosine > threshold.

    An edge (i, j) exists when j is among i's k neighbours or i among j's (the union), so the result
    does not depend on query order. ``k`` is capped at the number of other rows.
    """
    cfg = KnnConfig(k=k, threshold=threshold, index=index, nlist=nlist, nprobe=nprobe, ivf_min_rows=ivf_min_rows,
                    use_gpu=use_gpu, query_batch=query_batch)
    return knn_graph(shards, cfg)


def knn_graph(shards: VectorSource, cfg: KnnConfig) -> KnnGraph:
    cfg.validate()
    if shards.num_rows == 0:
        return KnnGraph(edges=empty_edges(), ids=[])
    return KnnGraph(edges=undirected(self_edges(shards, cfg)), ids=shards.ids())


def blocked_settings(n: int, cfg: KnnConfig) -> dict[str, int]:
    """nlist / nprobe / train_rows of the blocked IVF over n database rows."""
    # Imported here: blocked_ivf imports this module's types.
    from components.curation.blocked_ivf import DEFAULT_TRAIN_PER_LIST, default_blocked_nlist

    nlist = cfg.nlist or default_blocked_nlist(n)
    nprobe = cfg.nprobe or DEFAULT_BLOCKED_NPROBE
    return {"nlist": nlist, "nprobe": nprobe, "train_rows": DEFAULT_TRAIN_PER_LIST * nlist}


def self_edges(shards: VectorSource, cfg: KnnConfig) -> KnnEdges:
    """Directed edges row -> each of its k nearest other rows with cosine > threshold (the index is
    freed on return, before the caller sorts the edges)."""
    if resolve_kind(cfg.index, shards.num_rows, cfg.ivf_min_rows, self_join=True) == "ivf_blocked":
        from components.curation.blocked_ivf import blocked_self_edges

        return blocked_self_edges(shards, k=cfg.k, threshold=cfg.threshold, **blocked_settings(shards.num_rows, cfg))
    built = build_index(shards, cfg)
    return search_edges(built.index, shards, cfg.k, cfg.threshold, exclude_self=True, query_batch=cfg.query_batch)


def cross_edges(queries: VectorSource, database: VectorSource, cfg: KnnConfig) -> KnnEdges:
    """Edges query row -> database row (each side numbered from 0) for the k nearest database rows."""
    cfg.validate()
    if queries.num_rows == 0 or database.num_rows == 0:
        return empty_edges()
    if queries.dim != database.dim:
        raise ValueError(f"query vectors have width {queries.dim}, database vectors {database.dim}")
    if resolve_kind(cfg.index, database.num_rows, cfg.ivf_min_rows) == "ivf_blocked":
        from components.curation.blocked_ivf import blocked_cross_edges

        return blocked_cross_edges(database, queries, k=cfg.k, threshold=cfg.threshold,
                                   **blocked_settings(database.num_rows, cfg))
    built = build_index(database, cfg)
    return search_edges(built.index, queries, cfg.k, cfg.threshold, exclude_self=False, query_batch=cfg.query_batch)
