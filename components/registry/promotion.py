"""Champion / challenger in the registry: the champion's numbers read back, decisions recorded, the alias moved.

The evaluate stage writes a version's own metrics as ``eval.<metric>`` tags (publish.py); reading them
back lets a report put the champion beside the model being evaluated without evaluating it again.
The decision itself is evaluation's (components/evaluate/promotion.py, pure numbers); here it takes
effect. ``apply_decision`` is the only place that moves the ``champion`` alias, and only when the
decision says so; it records the decision on both versions as ``promotion.*`` tags. A caller whose
evaluation failed never gets a Decision to apply: it calls ``record_failure``, which tags and moves nothing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from components.evaluate.promotion import Decision, PromotionPolicy

TAG_PREFIX = "promotion."
# MLflow caps a model-version tag value at 5,000 characters; reasons and errors are cut below that.
_MAX_TAG_CHARS = 4000
EVAL_TAG_PREFIX = "eval."  # as publish.tag_evaluation writes them
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


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def decision_tags(decision: Decision, role: str, champion_version: str | None, challenger_version: str,
                  at: str) -> dict[str, str]:
    """The ``promotion.*`` tags one version gets; ``role`` is which side of the comparison it was on."""
    tags = {
        "decision": decision.label,
        "role": role,
        "at": at,
        "primary_metric": decision.primary_metric,
        "challenger_version": challenger_version,
        "champion_version": champion_version or "",
        "reasons": "; ".join(decision.reasons)[:_MAX_TAG_CHARS],
    }
    if decision.primary_delta is not None:
        tags["primary_delta"] = f"{decision.primary_delta:.6f}"
    tags.update({key: f"{value:.6f}" for key, value in decision.numbers.items()})
    return {TAG_PREFIX + key: value for key, value in tags.items()}


def apply_decision(client: Any, name: str, decision: Decision, champion_version: str | None,
                   challenger_version: str, policy: PromotionPolicy | None = None) -> None:
    """Tag both versions with the decision; move the champion alias to the challenger only if it promotes.

    ``client`` is an ``mlflow.MlflowClient`` pointed at the registry. Tags are written before the alias
    moves, so a crash in between leaves a recorded decision and the old champion, never the reverse."""
    policy = policy or PromotionPolicy()
    at = _now()
    sides = [("challenger", challenger_version)]
    if champion_version is not None and champion_version != challenger_version:
        sides.append(("champion", champion_version))
    for role, version in sides:
        for key, value in decision_tags(decision, role, champion_version, challenger_version, at).items():
            client.set_model_version_tag(name, version, key, value)
    if decision.promote:
        client.set_registered_model_alias(name, policy.champion_alias, challenger_version)


def record_failure(client: Any, name: str, version: str, role: str, error: BaseException | str) -> None:
    """A version whose evaluation failed: tagged ``promotion.decision=evaluation_failed``; no alias moves."""
    tags = {"decision": "evaluation_failed", "role": role, "at": _now(), "error": str(error)[:_MAX_TAG_CHARS]}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, TAG_PREFIX + key, value)
