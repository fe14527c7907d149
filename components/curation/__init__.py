"""Data curation (DINOv2 §3 / appendix A): ingest, validation and exact dedup of a raw image pool.

The later steps live in their own modules and are imported from there (they pull in torch / faiss):
embed, dedup_near, retrieval, hierarchical, and the whole stage in pipeline (``run_curation``), config
(``CurateConfig``), demo_pool (planted-truth demo) and pictures.
"""

from __future__ import annotations

from components.curation.dedup_exact import dedup_exact
from components.curation.descriptor import PixelDescriptor
from components.curation.ingest import (
    IngestConfig,
    IngestResult,
    ReconciliationError,
    ingest_pool,
    write_ingest_outputs,
)
from components.curation.listing import list_pool
from components.curation.reasons import REASONS
from components.curation.report import ingest_stats, stats_markdown
from components.curation.schema import KEPT_SCHEMA, REJECTED_SCHEMA
from components.curation.validate import check_object, make_rules

__all__ = [
    "KEPT_SCHEMA",
    "REASONS",
    "REJECTED_SCHEMA",
    "IngestConfig",
    "IngestResult",
    "PixelDescriptor",
    "ReconciliationError",
    "check_object",
    "dedup_exact",
    "ingest_pool",
    "ingest_stats",
    "list_pool",
    "make_rules",
    "stats_markdown",
    "write_ingest_outputs",
]
