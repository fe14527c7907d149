"""Typed parameters of a pretraining run (``params/pretrain.yaml``).

The objective (``dino``, ``ibot``, ``teacher``, ``optim``, ``precision``) has the official defaults;
presets override them (``params/pretrain.yaml`` ships the CPU preset for Fashion-MNIST).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from components.config import load_config
from components.data.multicrop import MultiCropConfig
from components.models import BackboneConfig
from components.ssl.config import ObjectiveConfig


@dataclass
class DataConfig:
    manifest: str = "data/demo/pool.parquet"  # parquet with a `uri` column (and optionally `split`)
    splits: list[str] = field(default_factory=list)  # keep only these `split` values; empty = all rows
    batch_size_per_rank: int = 64
    num_workers: int = 2
    seed: int = 0
    # "per_sample": the official path (torchvision on each image in the loader workers). "batched": the
    # loader only decodes; each batch is cropped at once on tensors (components/data/batched_multicrop.py,
    # same distributions, several times cheaper on small images; docs/augmentation.md).
    augmentation: Literal["per_sample", "batched"] = "per_sample"

    def validate(self) -> None:
        if self.batch_size_per_rank < 1 or self.num_workers < 0:
            raise ValueError("batch_size_per_rank must be >= 1 and num_workers >= 0")
        if self.augmentation not in ("per_sample", "batched"):
            raise ValueError(f"augmentation must be 'per_sample' or 'batched', got {self.augmentation!r}")


@dataclass
class HighResConfig:
    """The paper's high-resolution adaptation: the last ``iterations`` steps at larger crops."""

    enabled: bool = False
    iterations: int = 10_000
    global_crops_size: int = 518
    local_crops_size: int = 112


@dataclass
class RunConfig:
    output_dir: str = "outputs/pretrain"  # checkpoints and the exported backbone
    checkpoint_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    device: Literal["auto", "cpu", "cuda"] = "auto"
    registered_model_name: str = "dinoflow-backbone"
    max_steps: int = 0  # stop early after this many steps of this invocation (0 = run to the end)
    # Data parallelism (components/train/parallel.py): "ddp" = full replica per rank + gradient all-reduce;
    # "fsdp" = FSDP2 sharding of student and teacher (gradients reduce-scattered, optimizer state sharded);
    # "auto" = fsdp when world size > 1 on CUDA, else ddp. A single process never shards.
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    # FSDP parameter dtype for forward/backward (the MixedPrecisionPolicy's param_dtype; gradients are always
    # reduced in fp32 and the sharded master weights stay fp32). bf16 is meant for GPUs; use fp32 on CPU/gloo.
    fsdp_param_dtype: Literal["bf16", "fp32"] = "bf16"

    # Continued pretraining: start the student and teacher backbones from existing weights (a dinoflow
    # backbone folder, a .safetensors/.pth state_dict, an official training checkpoint, or hub:<name>),
    # with the backbone frozen (lr 0) for the first head_warmup_iters steps while the new heads warm up.
    init_backbone: str = ""
    head_warmup_iters: int = 0
    # Mirror every committed checkpoint to the project's object store under this key prefix (empty: off);
    # a run whose local checkpoint folder is empty (a new machine) resumes from the newest mirrored one.
    checkpoint_store_prefix: str = ""
    # Also log the final full checkpoint (student, teacher, heads, optimizer) as MLflow artifacts of the run,
    # so training can be continued from the registry's lineage; off for models whose checkpoint is very large.
    log_checkpoint_to_mlflow: bool = True

    def validate(self) -> None:
        if self.head_warmup_iters < 0:
            raise ValueError("head_warmup_iters must be >= 0")
        if self.checkpoint_every < 1 or self.keep_last < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every, keep_last and log_every must be >= 1")


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    highres: HighResConfig = field(default_factory=HighResConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def crop_sizes(self) -> dict[str, int]:
        """Every crop size the run will feed the backbone, by its params key (local crops only when there
        are some; the high-resolution phase only when it is on)."""
        sizes = {"crops.global_crops_size": self.crops.global_crops_size}
        if self.crops.local_crops_number > 0:
            sizes["crops.local_crops_size"] = self.crops.local_crops_size
        if self.highres.enabled:
            sizes["highres.global_crops_size"] = self.highres.global_crops_size
            if self.crops.local_crops_number > 0:
                sizes["highres.local_crops_size"] = self.highres.local_crops_size
        return sizes

    def check_patch_size(self, patch_size: int, patch_key: str, sizes: dict[str, int] | None = None) -> None:
        """Raise unless every crop size in ``sizes`` (default: all of :meth:`crop_sizes`) is a multiple of
        ``patch_size``: a crop that does not tile into patches would stop the run at the first step of its
        phase, which for the high-resolution phase is the end of a long run."""
        wrong = [f"{key} {size}" for key, size in (sizes or self.crop_sizes()).items() if size % patch_size]
        if wrong:
            raise ValueError(f"{', '.join(wrong)}: not a multiple of {patch_key} {patch_size}; crops must tile "
                             "into whole patches")

    def validate(self) -> None:
        self.check_patch_size(self.backbone.patch_size, "backbone.patch_size")
        if self.highres.enabled and self.highres.iterations >= self.objective.optim.iterations:
            raise ValueError("highres.iterations must be smaller than objective.optim.iterations")


def load_pretrain_config(path: str | Path = "params/pretrain.yaml", overrides: Sequence[str] = ()) -> PretrainConfig:
    return load_config(PretrainConfig, path, section="pretrain", overrides=overrides)
