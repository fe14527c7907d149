"""Helpers shared by the stage flows: Prefect run ids as MLflow tags, markdown reports."""

from __future__ import annotations

import json
from collections.abc import Mapping


def prefect_tags() -> dict[str, str]:
    """Tags linking an MLflow run to the Prefect flow run that made it (empty outside a flow)."""
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return {}
    return {"prefect.flow_run_id": str(run_id), "prefect.flow_run_name": str(flow_run.get_name() or "")}


def with_alias(overrides: list[str] | None, key: str, value: str | None) -> list[str]:
    """``overrides`` plus ``key=value`` when a shorthand flag (``--teacher``, ``--model``) gave a value."""
    return [*(overrides or []), *([f"{key}={json.dumps(value)}"] if value else [])]  # quoted: always a string


def markdown_table(rows: Mapping[str, object], key_header: str = "key", value_header: str = "value") -> str:
    lines = [f"| {key_header} | {value_header} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows.items()]
    return "\n".join(lines)


LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves the embedded store


def mlflow_run_url(run_id: str) -> str:
    """A link to a run in the MLflow UI: the tracking server itself, or `make mlflow-ui` for the embedded store."""
    import mlflow

    run = mlflow.get_run(run_id)
    tracking = mlflow.get_tracking_uri()
    base = tracking.rstrip("/") if tracking.startswith(("http://", "https://")) else LOCAL_MLFLOW_UI
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def training_run_markdown(title: str, outputs: Mapping[str, object]) -> str:
    """The artifact of a training stage (pretrain, distill): its outputs, then the last losses."""
    losses = outputs["losses"]
    assert isinstance(losses, dict)
    summary = {k: v for k, v in outputs.items() if k != "losses"}
    return (f"## {title}\n\n" + markdown_table(summary) + "\n\n### Last losses\n\n"
            + markdown_table({k: f"{v:.4f}" for k, v in losses.items()}, "term", "value") + "\n")
