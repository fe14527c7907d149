"""Machine-readable reason codes for every file the curation stage rejects.

A code is a stable string that goes into the ``reason`` column of ``rejects.parquet`` and into the
stats; the human-readable detail goes into ``message``. Codes are never renamed: downstream
queries and dashboards filter on them.
"""

from __future__ import annotations

UNSUPPORTED_EXTENSION = "unsupported_extension"
UNREADABLE = "unreadable"
ZERO_BYTES = "zero_bytes"
NOT_AN_IMAGE = "not_an_image"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
TRUNCATED = "truncated"
EXACT_DUPLICATE = "exact_duplicate"

# Retired: ingest used to reject a file whose extension named another format than its bytes (a PNG
# named .jpg). The format is now decided from the bytes and such a file is kept, with
# ``extension_mismatch`` set in kept.parquet. The code stays defined (older rejects tables hold it)
# but is no longer written, so it is not in ``REASONS``.
WRONG_EXTENSION = "wrong_extension"

# In the order the checks run: the first failing check names the reason.
REASONS: dict[str, str] = {
    UNSUPPORTED_EXTENSION: "the file name's extension is not one of the configured image extensions "
                           "and its bytes are no accepted image format either",
    UNREADABLE: "the object could not be read from the store (missing, broken link, permission or I/O error; "
                "a store outage stops the run instead)",
    ZERO_BYTES: "the object is empty",
    NOT_AN_IMAGE: "the bytes are not one of the accepted image formats (text, HTML error page, other format)",
    DECOMPRESSION_BOMB: "width x height exceeds max_pixels (a tiny file that would decode to huge memory)",
    TOO_SMALL: "the shorter side is below min_side",
    TRUNCATED: "the bytes start as an accepted image format but the file is cut off or corrupt "
               "(header unreadable, pixels fail to decode, or the end marker is missing)",
    EXACT_DUPLICATE: "byte-identical (same sha256) to another kept file; the lexicographically smallest uri is kept",
}

# Codes of the steps after ingest (embedding, near-dedup, relative dedup). Kept out of ``REASONS`` on
# purpose: ``REASONS`` is the ingest stage's closed set (its stats list every code, its tests check
# that a pool exercises all of them); ``ALL_REASONS`` is the union for tables that mix stages.
EMBED_FAILED = "embed_failed"
NEAR_DUPLICATE = "near_duplicate"
EVAL_LEAK = "eval_leak"

NEAR_DEDUP_REASONS: dict[str, str] = {
    EMBED_FAILED: "passed ingest but could not be read, decoded or embedded when computing embeddings",
    NEAR_DUPLICATE: "in a connected component of the cosine k-NN graph with a kept image (self near-dedup); "
                    "duplicate_of names the kept id",
    EVAL_LEAK: "in a connected component of the k-NN graph that contains an evaluation image (relative dedup); "
               "duplicate_of names that evaluation id",
}

# Selection (retrieval from seed sets, balanced sampling): valid, unique images that the curated set
# does not take. Counted as rejects so that every listed file is in the manifest or in rejects.parquet.
NOT_RETRIEVED = "not_retrieved"
NOT_SAMPLED = "not_sampled"

SELECTION_REASONS: dict[str, str] = {
    NOT_RETRIEVED: "valid and unique, but not among the images retrieved for the curated seed sets",
    NOT_SAMPLED: "retrieved, but not drawn by balanced sampling from the hierarchical k-means clusters",
}

ALL_REASONS: dict[str, str] = {**REASONS, **NEAR_DEDUP_REASONS, **SELECTION_REASONS}
