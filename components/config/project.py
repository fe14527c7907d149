"""Project-wide parameters (``params/project.yaml``): where objects, runs and flow state live.

Every setting has an embedded default that needs no server; the same code talks to real servers
when the params or the standard environment variables say so. Precedence: environment, then
params, then the embedded default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from components.config.loader import load_config
from components.storage.locations import StoreLocator

STORE_URI_ENV = "DINOFLOW_STORE_URI"


@dataclass
class StoreConfig:
    """The object store holding image pools, manifests' objects and checkpoints."""

    uri: str = ""  # empty: <state>/store (local folder); else s3://bucket/prefix or a local path
    endpoint_url: str | None = None  # S3-compatible endpoint; else AWS_ENDPOINT_URL, else AWS
    region: str | None = None
    create_bucket: bool = True  # create the bucket when missing (a fresh S3-compatible server)


@dataclass
class TrackingConfig:
    """MLflow tracking and registry."""

    uri: str = ""  # empty: sqlite:///<state>/mlflow/mlflow.db; MLFLOW_TRACKING_URI overrides
    experiment: str = "dinoflow"
    artifact_root: str = ""  # empty: <state>/mlflow/artifacts (for the embedded SQLite store)


@dataclass
class ProjectConfig:
    store: StoreConfig = field(default_factory=StoreConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def store_uri(self, state: Path, environ: Mapping[str, str] | None = None) -> str:
        env = os.environ if environ is None else environ
        return env.get(STORE_URI_ENV) or self.store.uri or str(state / "store")

    def store_locator(self, state: Path, environ: Mapping[str, str] | None = None) -> StoreLocator:
        """What a key in a manifest resolves against: this project's store (not opened, nothing created)."""
        return StoreLocator.for_uri(self.store_uri(state, environ), endpoint_url=self.store.endpoint_url)

    def tracking_uri(self, state: Path, environ: Mapping[str, str] | None = None) -> str:
        env = os.environ if environ is None else environ
        return env.get("MLFLOW_TRACKING_URI") or self.tracking.uri or f"sqlite:///{state / 'mlflow' / 'mlflow.db'}"

    def artifact_root(self, state: Path) -> str:
        return self.tracking.artifact_root or (state / "mlflow" / "artifacts").as_uri()


def load_project_config(path: str | Path = "params/project.yaml") -> ProjectConfig:
    """Load ``params/project.yaml``; a missing file means all embedded defaults."""
    if not Path(path).is_file():
        return ProjectConfig()
    return load_config(ProjectConfig, path)


def configured_store_locator(root: Path | None = None, project_params: str | Path = "params/project.yaml",
                             environ: Mapping[str, str] | None = None) -> StoreLocator:
    """The configured store of the project at (or above) ``root`` (default: the current folder), as
    :func:`components.stages.context.make_context` would open it: for readers handed no store."""
    from components.environment import project_root, state_dir

    top = project_root(root)
    params = Path(project_params)
    project = load_project_config(params if params.is_absolute() else top / params)
    return project.store_locator(state_dir(environ, top), environ)
