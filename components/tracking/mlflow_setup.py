"""MLflow against the embedded default (SQLite + local artifacts) or a real server, same code.

``mlflow`` is imported inside functions: importing it costs seconds and, without
``MLFLOW_DISABLE_TELEMETRY``, a DNS lookup, so callers apply the quiet environment first.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.config.loader import flatten
from components.config.project import ProjectConfig

# MLflow limits a param value to 6000 characters; longer values are cut rather than failing a run.
_MAX_PARAM_CHARS = 6000


@dataclass(frozen=True)
class TrackingTarget:
    tracking_uri: str
    experiment: str
    artifact_root: str | None  # only used when the experiment is created on a local store


def tracking_target(project: ProjectConfig, state: Path) -> TrackingTarget:
    uri = project.tracking_uri(state)
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return TrackingTarget(
        tracking_uri=uri,
        experiment=project.tracking.experiment,
        artifact_root=project.artifact_root(state) if local else None,
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
    """An MLflow run for one stage, with its params and tags logged; yields the active run."""
    import mlflow

    configure(target)
    run_tags = {"dinoflow.stage": stage, **(tags or {})}
    with mlflow.start_run(run_name=stage, nested=nested, tags=run_tags) as run:
        mlflow.log_params(loggable_params(config, f"{stage}."))
        yield run
