"""Everything a stage needs besides its own params: paths, object store, tracking target, tags."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from components.config.project import ProjectConfig, load_project_config
from components.environment import apply_environment, project_root
from components.storage import ObjectStore, open_store
from components.tracking import TrackingTarget, git_tags, tracking_target


@dataclass
class StageContext:
    root: Path  # project root: relative params/outputs resolve against it
    state: Path  # state folder (.dinoflow/)
    project: ProjectConfig
    store: ObjectStore
    tracking: TrackingTarget
    tags: dict[str, str] = field(default_factory=dict)  # added to every MLflow run of the stage


def make_context(
    project_params: str | Path = "params/project.yaml",
    root: Path | None = None,
    extra_tags: Mapping[str, str] | None = None,
) -> StageContext:
    """Resolve the project: apply the quiet environment, load params, open the store."""
    top = root or project_root()
    state = apply_environment(start=top)
    params_path = Path(project_params)
    project = load_project_config(params_path if params_path.is_absolute() else top / params_path)
    store = open_store(
        project.store_uri(state),
        endpoint_url=project.store.endpoint_url,
        region=project.store.region,
        create_bucket=project.store.create_bucket,
    )
    return StageContext(
        root=top,
        state=state,
        project=project,
        store=store,
        tracking=tracking_target(project, state, root=top),
        tags={**git_tags(top), **(extra_tags or {})},
    )
