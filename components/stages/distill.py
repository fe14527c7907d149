"""The ``distill`` stage: train a small student from a frozen teacher (DINOv2 §5), export its EMA, register it.

The teacher comes from the MLflow registry (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``), a
pretraining checkpoint, a backbone folder or an official state_dict (components/distill/teacher.py).
A registry teacher whose training run logged its checkpoint (the pretrain stage does by default) is
distilled through its heads; otherwise in feature space. The run and the registered student carry
the teacher's identity as tags (``dinoflow.teacher_uri``, ``_name``, ``_version``, ``_fingerprint``,
``dinoflow.distill_mode``). Runs under torchrun like pretraining (every rank calls :func:`run_distill`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from components.distill.config import DistillConfig, load_distill_config
from components.distill.meta_arch import DistillMetaArch, Mode, distill_recipe, objective_for_teacher
from components.distill.teacher import FrozenTeacher, load_teacher, resolve_mode
from components.models.export import save_backbone
from components.registry.publish import register_backbone
from components.registry.resolve import resolve, version_checkpoint
from components.stages.context import StageContext
from components.storage.atomic import write_text_atomic
from components.tracking import stage_run
from components.tracking.mlflow_setup import configure
from components.tracking.steps import MlflowStepTracker
from components.train.distributed import DistEnv, barrier, init_distributed, shutdown_distributed
from components.train.engine import PretrainResult, run_pretraining

__all__ = ["DistillOutputs", "TeacherRef", "load_distill_config", "run_distill"]

TAG_PREFIX = "dinoflow."


@dataclass(frozen=True)
class TeacherRef:
    uri: str  # as configured
    location: str  # what was loaded: a local folder or file, or hub:NAME
    name: str | None = None  # registered model name and version, for a registry teacher
    version: str | None = None


@dataclass(frozen=True)
class DistillOutputs:
    result: PretrainResult
    mode: Mode
    teacher: TeacherRef
    backbone_dir: Path | None  # the exported student EMA backbone (rank 0, when training finished)
    run_id: str | None
    model_version: str | None

    def summary(self) -> dict[str, object]:
        """What the CLI prints, the flow returns and its report shows: steps, the teacher, paths, ids, losses."""
        return {**self.result.summary(), "mode": self.mode, "teacher_uri": self.teacher.uri,
                "teacher_name": self.teacher.name, "teacher_version": self.teacher.version,
                "backbone_dir": str(self.backbone_dir) if self.backbone_dir else None,
                "mlflow_run_id": self.run_id, "model_version": self.model_version}


def run_distill(context: StageContext, cfg: DistillConfig) -> DistillOutputs:
    env = init_distributed(cfg.run.device)
    try:
        if not env.is_main:
            barrier()  # rank 0 resolves (and downloads) a registry teacher first
            configure(context.tracking)
            ref = resolve_teacher(cfg, context)
            teacher, mode, cfg = prepare(cfg, ref, env)
            result, _ = run_pretraining(cfg, env, context.root, store=context.store,
                                        recipe=distill_recipe(teacher, mode, cfg.features))
            return DistillOutputs(result, mode, ref, None, None, None)
        import mlflow

        with stage_run(context.tracking, "distill", cfg, tags={**context.tags,
                       "dinoflow.world_size": str(env.world_size)}) as run:
            ref = resolve_teacher(cfg, context)  # inside the run: the registry is the project's
            barrier()
            teacher, mode, cfg = prepare(cfg, ref, env)
            lineage = lineage_tags(ref, teacher, mode)
            mlflow.set_tags(lineage)
            mlflow.log_params({"distill.resolved_mode": mode, "distill.teacher_arch": teacher.config.arch,
                               "distill.student_prototypes": cfg.objective.dino.head.n_prototypes})
            mlflow.enable_system_metrics_logging()
            tracker = MlflowStepTracker(cfg.objective.optim.iterations, start_step=0)
            result, model = run_pretraining(cfg, env, context.root, tracker, store=context.store,
                                            recipe=distill_recipe(teacher, mode, cfg.features))
            backbone_dir = version = None
            if result.finished:
                backbone_dir = export_student(cfg, context.root, model, result, lineage)
                mlflow.log_artifacts(str(backbone_dir), artifact_path="backbone")
                if cfg.checkpoint.log_to_mlflow and result.checkpoint is not None:
                    mlflow.log_artifacts(str(result.checkpoint), artifact_path="checkpoint")
                version = register_backbone(cfg.publish.registered_model_name, run.info.run_id, backbone_dir,
                                            tags=lineage)
            mlflow.log_metrics({"final_step": float(result.end_step), "skipped_images": float(result.skipped_images)})
            write_metrics(context.root, cfg, result, mode)
        barrier()
        return DistillOutputs(result, mode, ref, backbone_dir, run.info.run_id, version)
    finally:
        shutdown_distributed()


def prepare(cfg: DistillConfig, ref: TeacherRef, env: DistEnv) -> tuple[FrozenTeacher, Mode, DistillConfig]:
    """Load the frozen teacher on this rank's device, pick the mode, give the student's heads its prototypes."""
    t = cfg.teacher
    teacher = load_teacher(ref.location, t.backbone, env.device, t.precision)
    mode = resolve_mode(t.mode, teacher)
    return teacher, mode, dataclasses.replace(cfg, objective=objective_for_teacher(cfg.objective, teacher, mode))


# ---------------------------------------------------------------- teacher


def resolve_teacher(cfg: DistillConfig, context: StageContext) -> TeacherRef:
    """A local path for the configured teacher: registry versions are downloaded to the state folder, with
    the training checkpoint of their run (heads included) when it logged one and the mode can use heads."""
    source = cfg.teacher.source
    cache = context.state / "cache" / "models"
    model = resolve(source, context.root, cache)
    if model.from_registry:
        assert model.name is not None and model.version is not None and model.backbone_dir is not None
        location = str(model.backbone_dir)
        if cfg.teacher.mode != "features" and cfg.teacher.use_registry_checkpoint:
            checkpoint = version_checkpoint(model, cache)
            location = str(checkpoint) if checkpoint is not None else location
        return TeacherRef(uri=source, location=location, name=model.name, version=model.version)
    if model.source.kind == "path":
        assert model.directory is not None
        return TeacherRef(uri=source, location=str(model.directory))
    return TeacherRef(uri=source, location=source)  # hub: and state_dict: name their own weights


def lineage_tags(ref: TeacherRef, teacher: FrozenTeacher, mode: Mode) -> dict[str, str]:
    tags = {f"{TAG_PREFIX}teacher_uri": ref.uri, f"{TAG_PREFIX}teacher_kind": teacher.kind,
            f"{TAG_PREFIX}teacher_arch": teacher.config.arch, f"{TAG_PREFIX}teacher_fingerprint": teacher.fingerprint(),
            f"{TAG_PREFIX}distill_mode": mode}
    if ref.name is not None and ref.version is not None:
        tags.update({f"{TAG_PREFIX}teacher_name": ref.name, f"{TAG_PREFIX}teacher_version": ref.version})
    return tags


# ---------------------------------------------------------------- outputs


def export_student(cfg: DistillConfig, root: Path, model: object, result: PretrainResult,
                   lineage: dict[str, str]) -> Path:
    """The student's EMA backbone (the paper's final model, not the raw student) as safetensors + config.json."""
    assert isinstance(model, DistillMetaArch)
    crops = cfg.crops
    # No run id and no registry version number in the folder: it is a DVC output, and the same weights must
    # give the same files whichever version number the teacher got in this store (stages/pretrain.py
    # export_teacher). The teacher is named by its weights' fingerprint; the version stays on the tags.
    folder_lineage = {k: v for k, v in lineage.items() if k != f"{TAG_PREFIX}teacher_version"}
    metadata: dict[str, Any] = {"step": result.end_step,
                                "global_crops_size": crops.global_crops_size, **folder_lineage}
    return save_backbone(model.backbone("teacher"), cfg.backbone, root / cfg.run.output_dir / "backbone",
                         mean=crops.normalize_mean, std=crops.normalize_std, metadata=metadata)


def write_metrics(root: Path, cfg: DistillConfig, result: PretrainResult, mode: Mode) -> Path:
    """``<output_dir>/metrics.json`` (a DVC metric), written to a temp file and renamed into place."""
    path = root / cfg.run.output_dir / "metrics.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"distill": {"final_step": result.end_step, "skipped_images": result.skipped_images, "mode": mode,
                           **{k: round(v, 6) for k, v in result.last_losses.items()}}}
    write_text_atomic(json.dumps(payload, indent=2, sort_keys=True) + "\n", path)
    return path
