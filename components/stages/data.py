"""The ``data`` stage: build the demo image pool and its labels table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from components.config import load_config
from components.data.demo_pool import DemoDataConfig, DemoDataResult, build_demo_pool
from components.stages.context import StageContext
from components.tracking import stage_run


def load_data_config(path: str | Path = "params/data.yaml", overrides: Sequence[str] = ()) -> DemoDataConfig:
    return load_config(DemoDataConfig, path, section="demo", overrides=overrides)


def run_data(context: StageContext, config: DemoDataConfig) -> DemoDataResult:
    """Write the demo pool to the object store and the manifest to ``config.manifest``; track it."""
    import mlflow

    with stage_run(context.tracking, "data", config, tags=context.tags):
        result = build_demo_pool(config, context.store, context.state, context.root)
        mlflow.log_metrics({f"images_{key}": float(value) for key, value in result.counts.items()})
        mlflow.set_tags({"dinoflow.store": context.store.uri, "dinoflow.labels_uri": result.labels_uri})
    return result
