"""Markdown table of cpu_quality results: one row per JSON file, k-NN top-1 at each evaluated minute.

    python benchmarks/cpu_quality_table.py benchmarks/results/cpu_quality/screen/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def row(path: Path) -> tuple[str, dict[float, float], dict[str, object]]:
    record = json.loads(path.read_text())
    points = {float(p["minutes"]): float(p["knn_top1"]) for p in record["curve"]}
    return record["label"], points, record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args()
    rows = [row(path) for path in args.results]
    minutes = sorted({m for _, points, _ in rows for m in points})
    header = ["run", "overrides", *[f"{m:g} min" for m in minutes], "images/s", "steps"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for label, points, record in rows:
        overrides = " ".join(f"`{o}`" for o in record.get("overrides", [])) or "(preset)"
        cells = [f"{points[m]:.3f}" if m in points else "" for m in minutes]
        print(f"| {label} | {overrides} | " + " | ".join(cells) +
              f" | {record.get('images_per_second', '')} | {record.get('steps', '')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
