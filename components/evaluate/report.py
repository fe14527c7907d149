"""The evaluation table people read at the end of a run, from ``metrics/eval.json`` alone.

``metrics/eval.json`` is flat (DVC metrics): the model's keys as is (``knn_top1_k20``) and each
baseline's as ``baseline_<name>_<key>``. This folds them back into one row per metric with a column
per baseline, without MLflow or Prefect, so ``dinoflow report`` answers in a second.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

BASELINE_PREFIX = "baseline_"
BASELINE_COLUMNS = ("random_init", "random_no_layerscale", "pixels")  # in the order the stage computes them


def split_baselines(flat: Mapping[str, float]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(model metrics, {baseline: metrics}) from the flat keys."""
    model = {k: float(v) for k, v in flat.items() if not k.startswith(BASELINE_PREFIX)}
    baselines: dict[str, dict[str, float]] = {}
    for key, value in flat.items():
        if not key.startswith(BASELINE_PREFIX):
            continue
        rest = key[len(BASELINE_PREFIX):]
        name = next((b for b in BASELINE_COLUMNS if rest.startswith(f"{b}_")), None)
        if name is None:  # an unknown baseline: its name is the first word
            name, _, _ = rest.partition("_")
        baselines.setdefault(name, {})[rest[len(name) + 1:]] = float(value)
    return model, baselines


def eval_json(metrics: Mapping[str, float]) -> dict[str, float]:
    """Flat keys for DVC from an evaluate stage's result: the model's as is, a baseline's
    ``random_init.knn_top1_k20`` as ``baseline_random_init_knn_top1_k20`` (no dots, which DVC would
    read as nesting). :func:`split_baselines` is its inverse."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = BASELINE_PREFIX + key.replace(".", "_") if "." in key else key
        out[name] = round(float(value), 6)
    return out


def metrics_table(model: Mapping[str, float], baselines: Mapping[str, Mapping[str, float]],
                  champion: Mapping[str, float] | None = None, metrics: tuple[str, ...] | None = None) -> str:
    """A markdown table: one row per model metric (all, or ``metrics``), the model, each baseline, the champion."""
    names = [b for b in BASELINE_COLUMNS if b in baselines] + sorted(set(baselines) - set(BASELINE_COLUMNS))
    columns: list[tuple[str, Mapping[str, float]]] = [(b, baselines[b]) for b in names]
    if champion:
        columns.append(("champion", champion))
    rows = [m for m in (metrics or tuple(sorted(model))) if m in model]
    lines = ["| metric | model | " + " | ".join(c for c, _ in columns) + " |", "|---|---|" + "---|" * len(columns)]
    for key in rows:
        cells = [f"{model[key]:.4f}"] + [f"{values[key]:.4f}" if key in values else "" for _, values in columns]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def eval_table(flat: Mapping[str, float], metrics: tuple[str, ...] | None = None) -> str:
    """:func:`metrics_table` of the flat ``metrics/eval.json`` keys."""
    return metrics_table(*split_baselines(flat), metrics=metrics)


def stage_table(metrics: Mapping[str, float], champion: Mapping[str, float] | None = None) -> str:
    """:func:`metrics_table` of an evaluate stage's result (dotted baseline keys), with the champion if given."""
    return metrics_table(*split_baselines(eval_json(metrics)), champion=champion)


HEADLINE_METRIC = "knn_top1_k20"
BASELINE_MEANING = {"random_init": "untrained, same init", "random_no_layerscale": "random features",
                    "pixels": "raw pixels"}


def baseline_verdict(model_value: float, baseline_values: Mapping[str, float], metric: str = HEADLINE_METRIC) -> str:
    """One plain sentence: by how many points (of a fraction metric) the model beats or misses each baseline.

    The table shows the numbers; this says what they mean, so a run that falls short of raw pixels says
    so by how much instead of leaving the subtraction to the reader."""
    parts = []
    known = [b for b in BASELINE_COLUMNS if b in baseline_values]
    for name in known + sorted(set(baseline_values) - set(BASELINE_COLUMNS)):
        points = 100 * (model_value - baseline_values[name])
        label = f"{name} ({BASELINE_MEANING[name]})" if name in BASELINE_MEANING else name
        parts.append(f"{points:+.1f} points vs {label}" if points >= 0
                     else f"{-points:.1f} points short of {label}")
    if not parts:
        return f"{metric} {model_value:.4f}: no baseline measured."
    return f"{metric} {model_value:.4f}: " + "; ".join(parts) + "."


def verdict_of(flat: Mapping[str, float], metric: str = HEADLINE_METRIC) -> str | None:
    """:func:`baseline_verdict` for the flat ``metrics/eval.json`` keys; None when the model lacks ``metric``."""
    model, baselines = split_baselines(flat)
    if metric not in model:
        return None
    return baseline_verdict(model[metric], {b: v[metric] for b, v in baselines.items() if metric in v}, metric)


def stage_verdict(metrics: Mapping[str, float], metric: str = HEADLINE_METRIC) -> str | None:
    """:func:`verdict_of` for an evaluate stage's result (dotted baseline keys)."""
    return verdict_of(eval_json(metrics), metric)


def read_eval_table(path: Path, metrics: tuple[str, ...] | None = None) -> str:
    """The table for the metrics file at ``path`` (FileNotFoundError names the stage to run)."""
    return eval_table(_read_flat(path), metrics)


def read_eval_report(path: Path, metrics: tuple[str, ...] | None = None) -> str:
    """What ``dinoflow report`` prints: the table, then the headline metric against each baseline in words."""
    flat = _read_flat(path)
    verdict = verdict_of(flat)
    return eval_table(flat, metrics) + (f"\n\n{verdict}" if verdict else "")


def _read_flat(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist yet: run `dvc repro evaluate` or `dinoflow evaluate`")
    return {k: float(v) for k, v in json.loads(path.read_text()).items()}
