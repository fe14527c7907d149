"""MLflow helpers: where runs go, stage runs with params and tags, code-version tags."""

from components.tracking.git import git_tags
from components.tracking.mlflow_setup import TrackingTarget, configure, loggable_params, stage_run, tracking_target

__all__ = ["TrackingTarget", "configure", "git_tags", "loggable_params", "stage_run", "tracking_target"]
