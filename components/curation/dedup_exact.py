"""Exact deduplication: byte-identical files (same sha256) collapse to one deterministic survivor."""

from __future__ import annotations

import polars as pl

from components.curation import reasons
from components.curation.schema import KEPT_SCHEMA, REJECTED_SCHEMA


def dedup_exact(kept: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split ``kept`` into (one row per sha256, the other copies as ``exact_duplicate`` rejections).

    The survivor of each group is the lexicographically smallest ``uri``: independent of listing
    order, thread scheduling and batch size, so reruns keep the same file.
    """
    ranked = kept.sort(["sha256", "uri"]).with_columns(
        pl.col("uri").first().over("sha256").alias("duplicate_of"),
        (pl.int_range(pl.len()).over("sha256") == 0).alias("_survivor"),
    )
    survivors = ranked.filter(pl.col("_survivor")).select(list(KEPT_SCHEMA)).sort("key")
    copies = ranked.filter(~pl.col("_survivor")).with_columns(
        pl.lit(reasons.EXACT_DUPLICATE).alias("reason"),
        pl.format("same bytes (sha256 {}) as kept {}", pl.col("sha256"), pl.col("duplicate_of")).alias("message"),
    )
    duplicates = copies.select(list(REJECTED_SCHEMA)).cast(REJECTED_SCHEMA).sort("key")
    return survivors, duplicates
