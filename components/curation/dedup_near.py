"""Near-duplicate removal on embeddings (DINOv2 paper §3, appendix A).

Self-dedup: connected components of the k-NN graph (k=64, cosine > 0.6) keep one image each.
Relative dedup: every pool image in a component (k=64, cosine > 0.45) that contains an evaluation
image is dropped, so no test image leaks into training even through a chain of near-copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import polars as pl

from components.curation import reasons
from components.curation.embed import EmbeddingShards
from components.curation.ingest import ReconciliationError, reconcile
from components.curation.knn_graph import InMemoryVectors, KnnConfig, VectorSource, cross_edges, knn_graph
from components.curation.schema import REJECTED_SCHEMA
from components.curation.union_find import connected_components

SELF_DEDUP = KnnConfig(k=64, threshold=0.6)  # paper: copy detection, k=64, cosine > 0.6
EVAL_DEDUP = KnnConfig(k=64, threshold=0.45)  # paper: relative dedup against eval sets, cosine > 0.45


@dataclass(frozen=True)
class NearDedupResult:
    kept: pl.DataFrame  # the input rows that survive, input order and columns
    rejected: pl.DataFrame  # REJECTED_SCHEMA: embed_failed + near_duplicate (or eval_leak)
    stats: dict[str, Any]


def keeper_rows(ids: Sequence[str], labels: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Per row (n,), the row kept for its component: most pixels, then the smallest id.

    The rule depends only on the images, not on shard order or faiss internals, so reruns agree.
    """
    frame = pl.DataFrame({"row": np.arange(len(ids)), "id": list(ids), "component": labels, "pixels": pixels})
    best = frame.sort(["component", "pixels", "id"], descending=[False, True, False]).group_by(
        "component", maintain_order=True).agg(pl.col("row").first().alias("keeper"))
    return frame.join(best, on="component", how="left").sort("row")["keeper"].to_numpy()  # (n,)


def self_dedup_assignments(source: VectorSource, cfg: KnnConfig, pixels: np.ndarray | None = None) -> pl.DataFrame:
    """One row per vector: ``id``, ``component`` (smallest row number in it), ``component_size``,
    ``duplicate_of`` (the kept id; null for kept rows). ``pixels`` (n,) ranks candidates; default all equal."""
    graph = knn_graph(source, cfg)
    n = graph.num_nodes
    labels = connected_components(n, graph.edges.src, graph.edges.dst)  # (n,)
    keepers = keeper_rows(graph.ids, labels, np.zeros(n, np.int64) if pixels is None else pixels)  # (n,)
    duplicate_of = [None if keeper == row else graph.ids[keeper] for row, keeper in enumerate(keepers.tolist())]
    sizes = np.bincount(labels, minlength=n)[labels] if n else np.zeros(0, np.int64)
    return pl.DataFrame({"id": graph.ids, "component": labels, "component_size": sizes,
                         "duplicate_of": pl.Series(duplicate_of, dtype=pl.Utf8)})


def near_dedup_from_vectors(ids: Sequence[str], vectors: np.ndarray, k: int = 64, threshold: float = 0.6,
                            pixels: np.ndarray | None = None, shard_size: int = 65_536) -> pl.DataFrame:
    """Self-dedup of precomputed unit vectors (N, D): the assignments of :func:`self_dedup_assignments`."""
    source = InMemoryVectors(list(ids), np.asarray(vectors, dtype=np.float32), shard_size)
    return self_dedup_assignments(source, replace(SELF_DEDUP, k=k, threshold=threshold), pixels)


def split_embedded(rows: pl.DataFrame, shards: EmbeddingShards | VectorSource,
                   embedded_ids: set[str]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows with an embedding, their ``embed_failed`` rejections); a row with neither is an error."""
    embedded = rows.filter(pl.col("id").is_in(list(embedded_ids)))
    missing = rows.filter(~pl.col("id").is_in(list(embedded_ids)))
    failures = shards.rejected() if isinstance(shards, EmbeddingShards) else pl.DataFrame(schema=REJECTED_SCHEMA)
    failed = failures.filter(pl.col("uri").is_in(missing["uri"].to_list()) if "uri" in missing.columns
                             else pl.lit(False))
    if failed.height != missing.height:
        raise ReconciliationError(f"{missing.height - failed.height} rows have no embedding and no embed rejection")
    return embedded, failed


def rejection_frame(rows: pl.DataFrame, reason: str, duplicate_of: list[str], messages: list[str]) -> pl.DataFrame:
    """REJECTED_SCHEMA rows for ``rows`` (any columns of the kept table), ``duplicate_of`` an id."""
    known = [c for c in ("uri", "key", "sha256", "bytes", "width", "height", "format") if c in rows.columns]
    frame = rows.select(known).with_columns(pl.lit(reason).alias("reason"),
                                            pl.Series("message", messages, dtype=pl.Utf8),
                                            pl.Series("duplicate_of", duplicate_of, dtype=pl.Utf8))
    missing = [pl.lit(None, dtype=dtype).alias(name) for name, dtype in REJECTED_SCHEMA.items()
               if name not in frame.columns]
    return frame.with_columns(missing).select(list(REJECTED_SCHEMA)).cast(REJECTED_SCHEMA)


def row_pixels(rows: pl.DataFrame, ids: list[str]) -> np.ndarray:
    """width * height (n,) of ``ids`` in that order (0 when the table has no sizes)."""
    if "width" not in rows.columns or "height" not in rows.columns:
        return np.zeros(len(ids), np.int64)
    sizes = rows.select("id", (pl.col("width").cast(pl.Int64) * pl.col("height").cast(pl.Int64)).alias("pixels"))
    order = pl.DataFrame({"id": ids}).with_row_index("row")
    return order.join(sizes, on="id", how="left").sort("row")["pixels"].fill_null(0).to_numpy()


def near_dedup(rows: pl.DataFrame, shards: EmbeddingShards | VectorSource,
               cfg: KnnConfig = SELF_DEDUP) -> NearDedupResult:
    """Self near-dedup of ``rows`` (a kept table: id, uri, width, height, ...) embedded in ``shards``.

    Every shard id must be a row; rows without an embedding must be ``embed_failed`` rejections of
    ``shards``. One image per component is kept (most pixels, then smallest id); the others are
    rejected as ``near_duplicate`` with ``duplicate_of`` = the kept id.
    """
    shard_ids = shards.ids()
    if not set(shard_ids) <= set(rows["id"].to_list()):
        raise ValueError("the shards hold ids that are not in rows: embed exactly the rows being deduplicated")
    embedded, failed = split_embedded(rows, shards, set(shard_ids))
    assignments = self_dedup_assignments(shards, cfg, row_pixels(rows, shard_ids))
    joined = embedded.join(assignments, on="id", how="left", maintain_order="left")
    duplicates = joined.filter(pl.col("duplicate_of").is_not_null())
    messages = [f"near-duplicate (cosine > {cfg.threshold}, k={cfg.k}) in a component of {size} images; kept {kept}"
                for size, kept in zip(duplicates["component_size"], duplicates["duplicate_of"], strict=True)]
    rejected = pl.concat([failed, rejection_frame(duplicates, reasons.NEAR_DUPLICATE,
                                                  duplicates["duplicate_of"].to_list(), messages)])
    kept = joined.filter(pl.col("duplicate_of").is_null()).select(rows.columns)
    reconcile("near dedup", rows.height, kept.height, rejected.height)
    stats = dedup_stats("near dedup", rows.height, kept, rejected, cfg)
    stats["components"] = int(assignments["component"].n_unique()) if assignments.height else 0
    stats["largest_component"] = int(assignments["component_size"].to_numpy().max()) if assignments.height else 0
    return NearDedupResult(kept=kept, rejected=rejected, stats=stats)


def leak_assignments(pool: VectorSource, evals: VectorSource, cfg: KnnConfig) -> pl.DataFrame:
    """Per pool row: ``id``, ``eval_id`` (smallest eval id in its component; null when none), ``component_size``.

    Nodes are pool rows 0..P-1 then eval rows P..P+E-1. Edges: the pool's own k-NN graph, plus each
    pool row's k nearest eval rows (a separate eval index, so eval neighbours cannot be crowded out of
    the top k by pool neighbours). Eval-eval edges are not needed: they cannot change which pool rows
    share a component with some eval image.
    """
    n_pool, n_eval = pool.num_rows, evals.num_rows
    pool_graph = knn_graph(pool, cfg)
    to_eval = cross_edges(pool, evals, cfg)
    src = np.concatenate([pool_graph.edges.src, to_eval.src])
    dst = np.concatenate([pool_graph.edges.dst, to_eval.dst + n_pool])
    labels = connected_components(n_pool + n_eval, src, dst)  # (P + E,)
    eval_ids = evals.ids()
    first_eval = (pl.DataFrame({"component": labels[n_pool:], "eval_id": eval_ids})
                  .group_by("component").agg(pl.col("eval_id").min()))
    sizes = np.bincount(labels, minlength=n_pool + n_eval)[labels[:n_pool]]
    frame = pl.DataFrame({"id": pool_graph.ids, "component": labels[:n_pool], "component_size": sizes})
    return frame.join(first_eval, on="component", how="left", maintain_order="left")


def eval_dedup(rows: pl.DataFrame, pool: EmbeddingShards | VectorSource, evals: VectorSource,
               cfg: KnnConfig = EVAL_DEDUP) -> NearDedupResult:
    """Drop every row of ``rows`` whose component (pool + eval graph) contains an evaluation image.

    ``pool`` may hold more ids than ``rows`` (e.g. images an earlier self-dedup removed): they still
    join components, which can only remove more, never let a leak through. Rejections have reason
    ``eval_leak`` and ``duplicate_of`` = the smallest eval id in the component.
    """
    pool_ids = pool.ids()
    if pool.num_rows and evals.num_rows and pool.dim != evals.dim:
        raise ValueError(f"pool vectors have width {pool.dim}, eval vectors {evals.dim}: embed both with one model")
    embedded, failed = split_embedded(rows, pool, set(pool_ids))
    assignments = leak_assignments(pool, evals, cfg) if pool.num_rows else pl.DataFrame(
        schema={"id": pl.Utf8, "component": pl.Int64, "component_size": pl.Int64, "eval_id": pl.Utf8})
    joined = embedded.join(assignments.unique("id", keep="first"), on="id", how="left", maintain_order="left")
    leaks = joined.filter(pl.col("eval_id").is_not_null())
    messages = [f"shares a component (cosine > {cfg.threshold}, k={cfg.k}, {size} images) with evaluation image {e}"
                for size, e in zip(leaks["component_size"], leaks["eval_id"], strict=True)]
    rejected = pl.concat([failed, rejection_frame(leaks, reasons.EVAL_LEAK, leaks["eval_id"].to_list(), messages)])
    kept = joined.filter(pl.col("eval_id").is_null()).select(rows.columns)
    reconcile("eval dedup", rows.height, kept.height, rejected.height)
    stats = dedup_stats("eval dedup", rows.height, kept, rejected, cfg)
    stats["eval_images"] = evals.num_rows
    stats["eval_images_matched"] = int(leaks["eval_id"].n_unique()) if leaks.height else 0
    return NearDedupResult(kept=kept, rejected=rejected, stats=stats)


def dedup_stats(step: str, n_in: int, kept: pl.DataFrame, rejected: pl.DataFrame, cfg: KnnConfig) -> dict[str, Any]:
    by_reason = {str(r): int(n) for r, n in rejected.group_by("reason").len().iter_rows()} if rejected.height else {}
    return {"step": step, "k": cfg.k, "threshold": cfg.threshold, "index": cfg.index,
            "steps": {"input": n_in, "kept": kept.height, "rejected": rejected.height},
            "rejected_by_reason": {code: by_reason.get(code, 0) for code in reasons.NEAR_DEDUP_REASONS}}
