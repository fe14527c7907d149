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
WRONG_EXTENSION = "wrong_extension"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
TRUNCATED = "truncated"
EXACT_DUPLICATE = "exact_duplicate"

# In the order the checks run: the first failing check names the reason.
REASONS: dict[str, str] = {
    UNSUPPORTED_EXTENSION: "the file name's extension is not one of the configured image extensions",
    UNREADABLE: "the object could not be read from the store (missing, broken link, I/O or network error)",
    ZERO_BYTES: "the object is empty",
    NOT_AN_IMAGE: "no enabled image decoder recognises the bytes (text, HTML error page, other format)",
    WRONG_EXTENSION: "the content decodes as a different format than the extension claims",
    DECOMPRESSION_BOMB: "width x height exceeds max_pixels (a tiny file that would decode to huge memory)",
    TOO_SMALL: "the shorter side is below min_side",
    TRUNCATED: "the header is fine but fully decoding the pixels fails (cut-off or corrupt data)",
    EXACT_DUPLICATE: "byte-identical (same sha256) to another kept file; the lexicographically smallest uri is kept",
}
