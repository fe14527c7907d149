"""Typed parameters of a distillation run (``params/distill.yaml``, section ``distill``).

A distillation run is a pretraining run (same data stream, crops, schedules, optimizer, checkpoints)
whose ``backbone`` is the student, plus a ``teacher`` section naming the frozen model that makes the
targets. The paper's recipe (§5) has no masking and no stochastic depth in the student, so
``backbone.drop_path_rate`` must be 0 and ``objective.ibot`` mask settings are unused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from components.config import load_config
from components.models import BackboneConfig
from components.registry.uri import parse_source
from components.train.config import PretrainConfig, PublishConfig, RunConfig

DistillMode = Literal["heads", "features"]


@dataclass
class FeatureLossConfig:
    """Feature-space distillation (teachers without heads): a learned linear projection student dim ->
    teacher dim, then ``distance`` to the teacher's normalised CLS and patch tokens."""

    distance: Literal["cosine", "smooth_l1"] = "cosine"
    cls_weight: float = 1.0
    patch_weight: float = 1.0
    smooth_l1_beta: float = 1.0

    def validate(self) -> None:
        if self.cls_weight < 0 or self.patch_weight < 0 or self.cls_weight + self.patch_weight == 0:
            raise ValueError("cls_weight and patch_weight must be >= 0 and not both 0")
        if self.smooth_l1_beta <= 0:
            raise ValueError("smooth_l1_beta must be > 0")


@dataclass
class TeacherSourceConfig:
    """The frozen teacher.

    ``source``: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` (MLflow registry), a dinoflow backbone
    folder, a pretraining checkpoint folder (``.../checkpoints/step_NNNNNNNNN``, with heads), an official
    DINOv2 ``.pth`` / ``.safetensors`` state_dict or ``hub:dinov2_vits14`` (backbone only; ``backbone``
    below then describes its architecture).
    ``mode``: ``auto`` distils through the heads when the source has them, in feature space otherwise.
    """

    source: str = "models:/dinoflow-backbone@challenger"
    mode: Literal["auto", "heads", "features"] = "auto"
    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(arch="vit_small", patch_size=14,
                                                                           img_size=518, drop_path_rate=0.0))
    # Autocast dtype of the teacher's forward: auto = bf16 on CUDA, fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Registry sources whose training run logged its checkpoint (pretrain's checkpoint.log_to_mlflow)
    # can be distilled through their heads: fetch the run's `checkpoint` artifact instead of the backbone.
    use_registry_checkpoint: bool = True

    def validate(self) -> None:
        if not self.source:
            raise ValueError("teacher.source must name a registry URI, a folder or a weights file")
        parse_source(self.source).require("registry", "path", "hub", "state_dict")  # malformed: fail at load


def default_student() -> BackboneConfig:
    return BackboneConfig(arch="vit_small", patch_size=14, drop_path_rate=0.0)


def default_run() -> RunConfig:
    return RunConfig(output_dir="outputs/distill")


def default_publish() -> PublishConfig:
    return PublishConfig(registered_model_name="dinoflow-student")


@dataclass
class DistillConfig(PretrainConfig):
    """Pretraining sections (``backbone`` is the student) plus the teacher and the feature loss."""

    backbone: BackboneConfig = field(default_factory=default_student)
    run: RunConfig = field(default_factory=default_run)
    publish: PublishConfig = field(default_factory=default_publish)
    teacher: TeacherSourceConfig = field(default_factory=TeacherSourceConfig)
    features: FeatureLossConfig = field(default_factory=FeatureLossConfig)

    def validate(self) -> None:
        super().validate()
        if self.backbone.drop_path_rate != 0.0:
            raise ValueError(f"backbone.drop_path_rate is {self.backbone.drop_path_rate}: the distillation recipe "
                             "trains the student without stochastic depth; set it to 0")


def load_distill_config(path: str | Path = "params/distill.yaml", overrides: Sequence[str] = ()) -> DistillConfig:
    return load_config(DistillConfig, path, section="distill", overrides=overrides)
