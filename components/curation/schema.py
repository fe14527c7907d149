"""Column schemas of the curation tables (``kept.parquet`` and ``rejects.parquet``).

``key`` is the object's key relative to the pool root (portable across store locations), ``uri``
the full address it was read from; the curate stage records a pool inside the configured object store
by store key instead (``<pool key>/<key>``, resolved against the store when read, see
components/storage/locations.py), so its tables are the same files in every checkout. Both tables
are sorted by ``key`` so reruns give identical files.
"""

from __future__ import annotations

import polars as pl

KEPT_SCHEMA = pl.Schema({
    "id": pl.Utf8,  # first 24 hex digits of sha256: content-derived, unique after exact dedup
    "uri": pl.Utf8,
    "key": pl.Utf8,
    "sha256": pl.Utf8,
    "width": pl.Int32,
    "height": pl.Int32,
    "format": pl.Utf8,  # Pillow's format name, decided from the bytes: JPEG, PNG, WEBP, ...
    "extension_mismatch": pl.Boolean,  # the name's extension says another format (a PNG named .jpg)
    "mode": pl.Utf8,  # Pillow's mode after decoding: RGB, L, RGBA, P, ...
    "bytes": pl.Int64,
})

REJECTED_SCHEMA = pl.Schema({
    "uri": pl.Utf8,
    "key": pl.Utf8,
    "reason": pl.Utf8,  # a code from components.curation.reasons.REASONS
    "message": pl.Utf8,  # human-readable detail
    # What was learnt before the rejection; null when the check failed earlier.
    "sha256": pl.Utf8,
    "bytes": pl.Int64,
    "width": pl.Int32,
    "height": pl.Int32,
    "format": pl.Utf8,  # the real format from the bytes, e.g. JPEG for a truncated JPEG named '.png'
    "duplicate_of": pl.Utf8,  # exact_duplicate only: the uri that was kept instead
})

ID_HEX_DIGITS = 24  # 96 bits: collision-free in practice even for billions of images


def image_id(sha256: str) -> str:
    return sha256[:ID_HEX_DIGITS]
