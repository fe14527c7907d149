"""MLflow helpers: where runs go, stage runs with params, tags and lineage, dataset inputs."""

from components.tracking.datasets import log_manifest_input
from components.tracking.git import git_tags
from components.tracking.lineage import PARENT_RUN_ENV, lineage_tags
from components.tracking.mlflow_setup import (
    TrackingTarget,
    configure,
    loggable_params,
    pipeline_run,
    stage_run,
    tracking_target,
)

__all__ = ["PARENT_RUN_ENV", "TrackingTarget", "configure", "git_tags", "lineage_tags", "log_manifest_input",
           "loggable_params", "pipeline_run", "stage_run", "tracking_target"]
