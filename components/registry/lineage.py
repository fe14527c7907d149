"""The lineage of a registered version, from whatever its source run recorded.

Run tags are grouped by who wrote them, and every group is optional: a version registered by hand,
or by an older dinoflow, simply has fewer groups. Nothing is required and nothing is invented.

| group | tags |
|---|---|
| ``code`` | ``git_sha``, ``git_dirty`` (components/tracking/git.py) |
| ``dvc`` | ``dvc.*``: stage, stage hash, dependency hashes, experiment (components/tracking/lineage.py) |
| ``orchestration`` | ``prefect.*``: the Prefect flow run; ``mlflow.parentRunId`` |
| ``teacher`` | any tag whose name mentions ``teacher`` (distillation) |
| ``dinoflow`` | other ``dinoflow.*`` tags: stage, world size, evaluated model ... |
| ``run`` | MLflow's run name, user and source (its other ``mlflow.*`` bookkeeping is left out) |
| ``other`` | the rest |

Dataset inputs (``mlflow.log_input``) are listed with their digests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GROUP_PREFIXES = (("code", ("git_",)), ("dvc", ("dvc.",)), ("orchestration", ("prefect.", "mlflow.parentRunId")))
MLFLOW_KEPT = {"mlflow.parentRunId", "mlflow.runName", "mlflow.user", "mlflow.source.name"}


def group_run_tags(tags: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Run tags sorted into the groups of the module docstring; empty groups are left out."""
    groups: dict[str, dict[str, str]] = {}
    for key in sorted(tags):
        groups.setdefault(tag_group(key), {})[key] = tags[key]
    groups.pop("mlflow", None)
    return groups


def tag_group(key: str) -> str:
    for group, prefixes in GROUP_PREFIXES:
        if key.startswith(prefixes):
            return group
    if "teacher" in key.lower():
        return "teacher"
    if key.startswith("dinoflow."):
        return "dinoflow"
    if key.startswith("mlflow."):
        return "run" if key in MLFLOW_KEPT else "mlflow"
    return "other"


def dataset_inputs(run: Any) -> list[dict[str, str]]:
    """``mlflow.log_input`` datasets of ``run``: name, digest, source type and source, context tag."""
    inputs = getattr(run, "inputs", None)
    rows = []
    for entry in getattr(inputs, "dataset_inputs", None) or []:
        dataset = entry.dataset
        context = {t.key: t.value for t in entry.tags or []}.get("mlflow.data.context", "")
        rows.append({"name": dataset.name, "digest": dataset.digest, "source_type": dataset.source_type,
                     "source": dataset.source, "context": context})
    return rows


def run_lineage(client: Any, run_id: str | None) -> dict[str, Any]:
    """The source run's identity, grouped tags and dataset inputs; a note when the run is gone."""
    if not run_id:
        return {"note": "the version names no source run"}
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # deleted run, another server: the version itself is still worth showing
        return {"run_id": run_id, "note": f"source run unavailable: {type(exc).__name__}: {exc}"[:300]}
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "experiment_id": run.info.experiment_id,
        "status": run.info.status,
        "start_time": run.info.start_time,
        "artifact_uri": run.info.artifact_uri,
        "tags": group_run_tags(run.data.tags),
        "datasets": dataset_inputs(run),
        "params": len(run.data.params),
        "metrics": dict(sorted(run.data.metrics.items())),
    }
