"""Prefect flow for the ``distill`` stage (single process; multi-process runs launch
``dinoflow distill --engine local`` under torchrun, as pretraining does)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.stages.context import make_context
from components.stages.distill import load_distill_config, run_distill
from flows.common import prefect_tags, training_run_markdown


@task(log_prints=True)
def distill_task(params: str, project_params: str, teacher: str | None = None) -> dict[str, object]:
    """Distil (resuming from the newest complete checkpoint); returns paths, ids and lineage, not tensors."""
    context = make_context(project_params, extra_tags=prefect_tags())
    cfg = load_distill_config(context.root / params)
    if teacher:
        cfg.teacher.source = teacher
    outputs = run_distill(context, cfg)
    r = outputs.result
    return {"start_step": r.start_step, "end_step": r.end_step, "total_steps": r.total_steps,
            "skipped_images": r.skipped_images, "checkpoint": str(r.checkpoint) if r.checkpoint else None,
            "mode": outputs.mode, "teacher_uri": outputs.teacher.uri, "teacher_name": outputs.teacher.name,
            "teacher_version": outputs.teacher.version,
            "backbone_dir": str(outputs.backbone_dir) if outputs.backbone_dir else None,
            "mlflow_run_id": outputs.run_id, "model_version": outputs.model_version, "losses": r.last_losses}


@flow(name="distill", log_prints=True)
def distill_flow(params: str = "params/distill.yaml", project_params: str = "params/project.yaml",
                 teacher: str | None = None) -> dict[str, object]:
    logger = get_run_logger()
    outputs = distill_task(params, project_params, teacher)
    logger.info("distill (%s from %s): steps %s..%s of %s", outputs["mode"], outputs["teacher_uri"],
                outputs["start_step"], outputs["end_step"], outputs["total_steps"])
    create_markdown_artifact(key="distill", description="Distillation run",
                             markdown=training_run_markdown("Distillation", outputs))
    return outputs
