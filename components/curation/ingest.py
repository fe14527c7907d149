"""Ingest a raw image pool: list it, validate and fully decode every file, drop exact duplicates.

The first step of LVD-142M-style curation (DINOv2 paper §3, appendix A). Every listed file ends
up in exactly one of two tables, ``kept`` or ``rejected`` (with a reason code), and the counts
must reconcile or the run fails rather than silently losing files.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from components.curation.dedup_exact import dedup_exact
from components.curation.listing import list_pool
from components.curation.report import ingest_stats
from components.curation.schema import KEPT_SCHEMA, REJECTED_SCHEMA, image_id
from components.curation.validate import Checked, ValidationRules, check_object, make_rules, pil_pixel_limit
from components.storage import ObjectStore, file_uri_to_path, open_store
from components.storage.atomic import write_parquet_atomic, write_text_atomic

DEFAULT_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
PIL_DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default: 1024 * 1024 * 1024 // 4 // 3


@dataclass
class IngestConfig:
    pool: str = ""  # local folder, file:///folder or s3://bucket/prefix
    extensions: list[str] = field(default_factory=lambda: list(DEFAULT_EXTENSIONS))  # case-insensitive
    max_pixels: int = PIL_DEFAULT_MAX_PIXELS  # decompression-bomb limit on width * height
    min_side: int = 1  # reject images whose shorter side is below this
    workers: int = 8  # threads: reading and decoding release the GIL
    batch_size: int = 256  # objects in flight at once; bounds memory for huge files

    def validate(self) -> None:
        if not self.pool:
            raise ValueError("pool must name a local folder, file:// or s3:// URI")
        if not self.extensions:
            raise ValueError("extensions must not be empty")
        if self.max_pixels < 1 or self.min_side < 1 or self.workers < 1 or self.batch_size < 1:
            raise ValueError("max_pixels, min_side, workers and batch_size must be >= 1")


@dataclass(frozen=True)
class IngestResult:
    kept: pl.DataFrame  # KEPT_SCHEMA, one row per unique image, sorted by key
    rejected: pl.DataFrame  # REJECTED_SCHEMA, sorted by key
    stats: dict[str, Any]


class ReconciliationError(RuntimeError):
    """Listed files and kept + rejected rows disagree: a file was lost or counted twice."""


def batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def open_pool(pool: str, store_opener: Callable[[str], ObjectStore]) -> ObjectStore:
    """Open the pool's store; a missing local folder is an error (open_store would create it)."""
    if not pool.startswith("s3://"):
        folder = file_uri_to_path(pool) if pool.startswith("file://") else Path(pool)
        if not folder.is_dir():
            raise FileNotFoundError(f"pool folder {folder} does not exist")
    return store_opener(pool)


def kept_frame(rows: list[Checked]) -> pl.DataFrame:
    records = [
        {"id": image_id(r.sha256 or ""), "uri": r.uri, "key": r.key, "sha256": r.sha256, "width": r.width,
         "height": r.height, "format": r.format, "extension_mismatch": r.extension_mismatch, "mode": r.mode,
         "bytes": r.bytes}
        for r in rows
    ]
    return pl.DataFrame(records, schema=KEPT_SCHEMA)


def rejected_frame(rows: list[Checked]) -> pl.DataFrame:
    records = [
        {"uri": r.uri, "key": r.key, "reason": r.reason, "message": r.message, "sha256": r.sha256, "bytes": r.bytes,
         "width": r.width, "height": r.height, "format": r.format, "duplicate_of": None}
        for r in rows
    ]
    return pl.DataFrame(records, schema=REJECTED_SCHEMA)


def validate_pool(store: ObjectStore, rules: ValidationRules, workers: int,
                  batch_size: int) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """(valid images, rejections, number listed), streaming the listing batch by batch.

    Each batch becomes two small columnar frames at once, so per-file Python objects never pile
    up beyond one batch.
    """
    kept_parts = [kept_frame([])]
    rejected_parts = [rejected_frame([])]
    n_listed = 0
    with pil_pixel_limit(rules.max_pixels), ThreadPoolExecutor(max_workers=workers) as executor:
        for batch in batched(list_pool(store), batch_size):
            n_listed += len(batch)
            results = list(executor.map(lambda key: check_object(store, key, rules), batch))
            kept_parts.append(kept_frame([r for r in results if r.reason is None]))
            rejected_parts.append(rejected_frame([r for r in results if r.reason is not None]))
    return pl.concat(kept_parts), pl.concat(rejected_parts), n_listed


def reconcile(step: str, n_listed: int, n_kept: int, n_rejected: int) -> None:
    """Raise (not ``assert``: it must hold under ``python -O`` too) when a file went missing."""
    if n_listed != n_kept + n_rejected:
        raise ReconciliationError(f"{step}: listed {n_listed} != kept {n_kept} + rejected {n_rejected}")


def ingest_pool(cfg: IngestConfig, store_opener: Callable[[str], ObjectStore] = open_store) -> IngestResult:
    """List, validate, decode and exact-dedup the pool at ``cfg.pool``; every file is kept or rejected."""
    cfg.validate()
    rules = make_rules(cfg.extensions, cfg.max_pixels, cfg.min_side)
    store = open_pool(cfg.pool, store_opener)
    valid, invalid, n_listed = validate_pool(store, rules, cfg.workers, cfg.batch_size)
    reconcile("validation", n_listed, valid.height, invalid.height)
    kept, duplicates = dedup_exact(valid)
    rejected = pl.concat([invalid, duplicates]).sort("key")
    reconcile("exact dedup", n_listed, kept.height, rejected.height)
    if kept["id"].n_unique() != kept.height:
        raise ReconciliationError("two different files share an id prefix; widen ID_HEX_DIGITS")
    stats = ingest_stats(store.uri, n_listed, valid.height, kept, rejected)
    return IngestResult(kept=kept, rejected=rejected, stats=stats)


def write_ingest_outputs(result: IngestResult, out_dir: str | Path) -> dict[str, Path]:
    """Write kept.parquet, rejects.parquet and stats.json, each atomically; return their paths."""
    folder = Path(out_dir)
    paths = {name: folder / name for name in ("kept.parquet", "rejects.parquet", "stats.json")}
    write_parquet_atomic(result.kept, paths["kept.parquet"])
    write_parquet_atomic(result.rejected, paths["rejects.parquet"])
    # stats.json last: its presence means both tables of this run are in place.
    write_text_atomic(json.dumps(result.stats, indent=2, sort_keys=True) + "\n", paths["stats.json"])
    return paths
