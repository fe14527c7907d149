"""MLflow against the embedded default (SQLite + local artifacts) or a real server, same code.

``mlflow`` is imported inside functions: importing it costs seconds and, without
``MLFLOW_DISABLE_TELEMETRY``, a DNS lookup, so callers apply the quiet environment first.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config.loader import flatten
from components.config.project import ProjectConfig
from components.tracking.lineage import PARENT_RUN_ENV, lineage_tags, parent_run_tags

# MLflow limits a param value to 6000 characters; longer values are cut rather than failing a run.
_MAX_PARAM_CHARS = 6000


@dataclass(frozen=True)
class TrackingTarget:
    tracking_uri: str
    experiment: str
    artifact_root: str | None  # only used when the experiment is created on a local store
    root: Path | None = None  # project root: where dvc.yaml names the stages (lineage tags); None: no DVC tags


def tracking_target(project: ProjectConfig, state: Path, root: Path | None = None) -> TrackingTarget:
    uri = project.tracking_uri(state)
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return TrackingTarget(
        tracking_uri=uri,
        experiment=project.tracking.experiment,
        artifact_root=project.artifact_root(state) if local else None,
        root=root,
    )


def configure(target: TrackingTarget) -> str:
    """Point MLflow (tracking and registry) at ``target``; create the experiment. Returns its id."""
    import mlflow

    mlflow.set_tracking_uri(target.tracking_uri)
    mlflow.set_registry_uri(target.tracking_uri)
    experiment = mlflow.get_experiment_by_name(target.experiment)
    if experiment is not None:
        experiment_id: str = experiment.experiment_id
    else:
        try:
            experiment_id = mlflow.create_experiment(target.experiment, artifact_location=target.artifact_root)
        except Exception:
            # Another process created it between our lookup and create: use theirs.
            found = mlflow.get_experiment_by_name(target.experiment)
            if found is None:
                raise
            experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def loggable_params(config: Any, prefix: str = "") -> dict[str, str]:
    """Flatten a config dataclass to MLflow params (dotted keys, string values within limits)."""
    return {key: str(value)[:_MAX_PARAM_CHARS] for key, value in flatten(config, prefix).items()}


@contextlib.contextmanager
def stage_run(
    target: TrackingTarget,
    stage: str,
    config: Any,
    tags: Mapping[str, str] | None = None,
    nested: bool = False,
) -> Iterator[Any]:
    """An MLflow run for one stage, with its params, tags and lineage logged; yields the active run.

    Lineage (components/tracking/lineage.py): the parent pipeline run named by DINOFLOW_PARENT_RUN_ID,
    and the DVC stage of the same name with the hashes of its current inputs.
    """
    import mlflow

    configure(target)
    lineage = parent_run_tags() if target.root is None else lineage_tags(target.root, stage)
    if nested or mlflow.active_run() is not None:
        lineage.pop("mlflow.parentRunId", None)  # MLflow sets the parent of a nested run itself
    run_tags = {"dinoflow.stage": stage, **lineage, **(tags or {})}
    with mlflow.start_run(run_name=stage, nested=nested, tags=run_tags) as run:
        mlflow.log_params(loggable_params(config, f"{stage}."))
        yield run


@contextlib.contextmanager
def pipeline_run(target: TrackingTarget, tags: Mapping[str, str] | None = None) -> Iterator[str]:
    """A parent MLflow run for one pipeline run; yields its id. Every stage run started meanwhile (in this
    process or a child process) becomes its child through ``DINOFLOW_PARENT_RUN_ID``.

    The parent is created with the client rather than made the active run, so stage code keeps
    starting plain top-level runs and needs no knowledge of whether a pipeline is around it.
    """
    from mlflow import MlflowClient

    experiment_id = configure(target)
    client = MlflowClient()
    run = client.create_run(experiment_id, run_name="pipeline", tags={"dinoflow.stage": "pipeline", **(tags or {})})
    run_id: str = run.info.run_id
    previous = os.environ.get(PARENT_RUN_ENV)
    os.environ[PARENT_RUN_ENV] = run_id
    status = "FAILED"
    try:
        yield run_id
        status = "FINISHED"
    finally:
        if previous is None:
            os.environ.pop(PARENT_RUN_ENV, None)
        else:
            os.environ[PARENT_RUN_ENV] = previous
        client.set_terminated(run_id, status)
