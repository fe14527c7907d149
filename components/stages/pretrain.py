"""The ``pretrain`` stage: train with the DINOv2 recipe, export the teacher backbone, register it.

Runs as one plain process or under torchrun (every rank calls :func:`run_pretrain`; only rank 0
talks to MLflow). Rerunning the same command after a crash continues from the newest complete
checkpoint in ``run.output_dir/checkpoints``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from components.models.export import save_backbone
from components.registry.publish import register_backbone
from components.stages.context import StageContext
from components.storage.atomic import write_text_atomic
from components.tracking import log_manifest_input, stage_run
from components.tracking.steps import MlflowStepTracker
from components.train.checkpoint import latest_checkpoint
from components.train.config import PretrainConfig, load_pretrain_config
from components.train.distributed import barrier, init_distributed, shutdown_distributed
from components.train.engine import PretrainResult, run_pretraining

__all__ = ["PretrainOutputs", "load_pretrain_config", "run_pretrain"]


@dataclass(frozen=True)
class PretrainOutputs:
    result: PretrainResult
    backbone_dir: Path | None  # exported teacher backbone (rank 0, when training finished)
    run_id: str | None
    model_version: str | None

    def summary(self) -> dict[str, object]:
        """What the CLI prints, the flow returns and its report shows: steps, paths, ids, last losses."""
        return {**self.result.summary(), "backbone_dir": str(self.backbone_dir) if self.backbone_dir else None,
                "mlflow_run_id": self.run_id, "model_version": self.model_version}


def run_pretrain(context: StageContext, cfg: PretrainConfig) -> PretrainOutputs:
    env = init_distributed(cfg.run.device)
    try:
        if not env.is_main:
            result, _ = run_pretraining(cfg, env, context.root, store=context.store)
            return PretrainOutputs(result, None, None, None)
        import mlflow

        with stage_run(context.tracking, "pretrain", cfg, tags={**context.tags,
                       "dinoflow.world_size": str(env.world_size)}) as run:
            mlflow.enable_system_metrics_logging()
            manifest = context.root / cfg.data.manifest
            if manifest.is_file():  # an s3:// manifest is fetched by the data loader, not logged here
                log_manifest_input(manifest, "pretrain-manifest")
            tracker = MlflowStepTracker(cfg.objective.optim.iterations, start_step=0)
            result, model = run_pretraining(cfg, env, context.root, tracker, store=context.store)
            backbone_dir = version = None
            if result.finished:
                backbone_dir = export_teacher(cfg, context.root, model, result)
                mlflow.log_artifacts(str(backbone_dir), artifact_path="backbone")
                # A rerun that finds training finished only re-exports: log the newest checkpoint anyway, so the
                # new version keeps its heads (distillation through the heads reads them from there).
                checkpoint = result.checkpoint or latest_checkpoint(context.root / cfg.run.output_dir / "checkpoints")
                if cfg.checkpoint.log_to_mlflow and checkpoint is not None:
                    mlflow.log_artifacts(str(checkpoint), artifact_path="checkpoint")
                version = register_backbone(cfg.publish.registered_model_name, run.info.run_id, backbone_dir)
            mlflow.log_metrics({"final_step": float(result.end_step), "skipped_images": float(result.skipped_images)})
            write_metrics(context.root, cfg, result)
        barrier()
        return PretrainOutputs(result, backbone_dir, run.info.run_id, version)
    finally:
        shutdown_distributed()


def export_teacher(cfg: PretrainConfig, root: Path, model: object, result: PretrainResult) -> Path:
    """The EMA teacher's backbone (the model users want) as safetensors + config.json."""
    from components.ssl.meta_arch import SSLMetaArch

    assert isinstance(model, SSLMetaArch)
    crops = cfg.crops
    return save_backbone(
        model.backbone("teacher"), cfg.backbone, root / cfg.run.output_dir / "backbone",
        mean=crops.normalize_mean, std=crops.normalize_std,
        # No run id in the folder: it is a DVC output, and a value that differs on every run would change
        # dvc.lock although data, params and code did not. The run is found through the registry version.
        metadata={"step": result.end_step, "global_crops_size": crops.global_crops_size},
    )


def write_metrics(root: Path, cfg: PretrainConfig, result: PretrainResult) -> None:
    payload = {"pretrain": {"final_step": result.end_step, "skipped_images": result.skipped_images,
                            **{k: round(v, 6) for k, v in result.last_losses.items()}}}
    write_text_atomic(json.dumps(payload, indent=2, sort_keys=True) + "\n", root / cfg.run.output_dir / "metrics.json")
