"""Ingest statistics (a JSON-able dict) and a markdown table of them for people."""

from __future__ import annotations

from typing import Any

import polars as pl

from components.curation.reasons import REASONS


def count_by(frame: pl.DataFrame, column: str) -> dict[str, int]:
    if frame.is_empty():
        return {}
    return {str(value): int(n) for value, n in frame.group_by(column).len().sort(column).iter_rows()}


def ingest_stats(pool: str, n_listed: int, n_valid: int, kept: pl.DataFrame, rejected: pl.DataFrame) -> dict[str, Any]:
    """Counts per step and per reason (every reason listed, zeros included, so runs compare cleanly)."""
    by_reason = count_by(rejected, "reason")
    return {
        "pool": pool,
        "steps": {
            "listed": n_listed,
            "valid": n_valid,  # decoded fine, before exact dedup
            "kept": kept.height,  # after exact dedup
            "rejected": rejected.height,
        },
        "rejected_by_reason": {code: by_reason.get(code, 0) for code in REASONS},
        "kept_by_format": count_by(kept, "format"),
        # kept although the name's extension says another format (a PNG named .jpg)
        "kept_extension_mismatch": int(kept["extension_mismatch"].sum()) if kept.height else 0,
        "kept_bytes": int(kept["bytes"].sum()) if kept.height else 0,
    }


def stats_markdown(stats: dict[str, Any]) -> str:
    """A short markdown report (for a Prefect artifact or an MLflow text artifact)."""
    steps = stats["steps"]
    listed = max(int(steps["listed"]), 1)  # percentages of an empty pool are 0, not a division error
    lines = [
        f"## Ingest of `{stats['pool']}`",
        "",
        "| step | images | % of listed |",
        "|---|---:|---:|",
    ]
    labels = {"listed": "listed", "valid": "valid (fully decoded)", "kept": "kept (after exact dedup)",
              "rejected": "rejected"}
    lines += [f"| {labels[name]} | {steps[name]:,} | {100 * steps[name] / listed:.1f}% |" for name in labels]
    lines += ["", "| reason | files | meaning |", "|---|---:|---|"]
    lines += [f"| `{code}` | {n:,} | {REASONS[code]} |" for code, n in stats["rejected_by_reason"].items()]
    formats = ", ".join(f"{fmt} {n:,}" for fmt, n in stats["kept_by_format"].items()) or "none"
    lines += ["", f"Kept formats: {formats}. Kept bytes: {stats['kept_bytes']:,}.",
              f"Kept with an extension that names another format: {stats.get('kept_extension_mismatch', 0):,}.", ""]
    return "\n".join(lines)
