"""The current champion's evaluation numbers, read back from its registry version's ``eval.*`` tags.

The evaluate stage writes a version's own metrics as ``eval.<metric>`` tags; reading them back lets a
report put the champion beside the model being evaluated without evaluating the champion again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

EVAL_TAG_PREFIX = "eval."
NON_METRIC_TAGS = frozenset({"run_id"})


@dataclass(frozen=True)
class ChampionMetrics:
    name: str
    version: str
    metrics: dict[str, float]  # the eval.* tags as numbers (no baselines: those are never tagged)
    run_id: str | None  # the evaluation run that wrote them


def metrics_from_tags(tags: dict[str, str]) -> dict[str, float]:
    """``eval.<metric>`` tags as floats; tags that are not numbers are skipped, not fatal."""
    metrics: dict[str, float] = {}
    for key, value in tags.items():
        if not key.startswith(EVAL_TAG_PREFIX) or key[len(EVAL_TAG_PREFIX):] in NON_METRIC_TAGS:
            continue
        try:
            metrics[key[len(EVAL_TAG_PREFIX):]] = float(value)
        except ValueError:
            continue
    return metrics


def version_by_alias(client: Any, name: str, alias: str) -> Any | None:
    """The ModelVersion behind ``name@alias``, or None when the model or the alias does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion_metrics(client: Any, name: str, alias: str = "champion",
                     exclude_version: str | None = None) -> ChampionMetrics | None:
    """The champion's numbers, or None: no champion, it is ``exclude_version`` itself, or never evaluated."""
    version = version_by_alias(client, name, alias)
    if version is None or str(version.version) == exclude_version:
        return None
    tags = dict(version.tags or {})
    metrics = metrics_from_tags(tags)
    if not metrics:
        return None
    return ChampionMetrics(name=name, version=str(version.version), metrics=metrics,
                           run_id=tags.get(EVAL_TAG_PREFIX + "run_id"))
