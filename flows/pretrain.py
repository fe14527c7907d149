"""Prefect flow for the ``pretrain`` stage (single process; multi-process runs launch
``dinoflow pretrain --engine local`` under torchrun, see README)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import training_run_markdown
from flows.stage_task import training_stage_task


@flow(name="pretrain", log_prints=True)
def pretrain_flow(params: str = "params/pretrain.yaml", project_params: str = "params/project.yaml",
                  overrides: list[str] | None = None) -> dict[str, object]:
    """Train (resuming from the newest complete checkpoint); returns paths and ids, not tensors."""
    logger = get_run_logger()
    outputs = training_stage_task.with_options(name="pretrain")("pretrain", params, project_params, overrides)
    logger.info("pretrain: steps %s..%s of %s", outputs["start_step"], outputs["end_step"], outputs["total_steps"])
    create_markdown_artifact(key="pretrain", description="Pretraining run",
                             markdown=training_run_markdown("Pretraining", outputs))
    return outputs
