"""Prefect flow for the ``pretrain`` stage (single process; multi-process runs launch
``dinoflow pretrain --engine local`` under torchrun, see README)."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from components.stages.context import make_context
from components.stages.pretrain import load_pretrain_config, run_pretrain
from flows.common import prefect_tags, training_run_markdown


@task(log_prints=True)
def pretrain_task(params: str, project_params: str) -> dict[str, object]:
    """Train (resuming from the newest complete checkpoint); returns paths and ids, not tensors."""
    context = make_context(project_params, extra_tags=prefect_tags())
    outputs = run_pretrain(context, load_pretrain_config(context.root / params))
    r = outputs.result
    return {"start_step": r.start_step, "end_step": r.end_step, "total_steps": r.total_steps,
            "skipped_images": r.skipped_images, "checkpoint": str(r.checkpoint) if r.checkpoint else None,
            "backbone_dir": str(outputs.backbone_dir) if outputs.backbone_dir else None,
            "mlflow_run_id": outputs.run_id, "model_version": outputs.model_version,
            "losses": r.last_losses}


@flow(name="pretrain", log_prints=True)
def pretrain_flow(params: str = "params/pretrain.yaml", project_params: str = "params/project.yaml"
                  ) -> dict[str, object]:
    logger = get_run_logger()
    outputs = pretrain_task(params, project_params)
    logger.info("pretrain: steps %s..%s of %s", outputs["start_step"], outputs["end_step"], outputs["total_steps"])
    create_markdown_artifact(key="pretrain", description="Pretraining run",
                             markdown=training_run_markdown("Pretraining", outputs))
    return outputs
