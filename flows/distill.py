"""Prefect flow for the ``distill`` stage (single process; multi-process runs launch
``dinoflow distill --engine local`` under torchrun, as pretraining does)."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.common import training_run_markdown, with_alias
from flows.stage_task import training_stage_task


@flow(name="distill", log_prints=True)
def distill_flow(params: str = "params/distill.yaml", project_params: str = "params/project.yaml",
                 teacher: str | None = None, overrides: list[str] | None = None) -> dict[str, object]:
    """Distil (resuming from the newest complete checkpoint); ``teacher`` is short for
    ``overrides=["teacher.source=..."]``. Returns paths, ids and lineage, not tensors."""
    logger = get_run_logger()
    overrides = with_alias(overrides, "teacher.source", teacher)
    outputs = training_stage_task.with_options(name="distill")("distill", params, project_params, overrides)
    logger.info("distill (%s from %s): steps %s..%s of %s", outputs["mode"], outputs["teacher_uri"],
                outputs["start_step"], outputs["end_step"], outputs["total_steps"])
    create_markdown_artifact(key="distill", description="Distillation run",
                             markdown=training_run_markdown("Distillation", outputs))
    return outputs
