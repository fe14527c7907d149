"""Typed parameters of a pretraining run (``params/pretrain.yaml``).

The objective (``dino``, ``ibot``, ``teacher``, ``optim``, ``precision``) has the official defaults;
presets override them (``params/pretrain.yaml`` ships the CPU preset for Fashion-MNIST).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

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
    """Where the run writes and how it reports (params section ``run``)."""

    # Keys of the earlier layout, by where they live now (the loader names the new place in its error).
    __moved_keys__: ClassVar[dict[str, str]] = {
        "checkpoint_every": "checkpoint.every", "keep_last": "checkpoint.keep_last",
        "checkpoint_store_prefix": "checkpoint.store_prefix",
        "log_checkpoint_to_mlflow": "checkpoint.log_to_mlflow", "strategy": "parallel.strategy",
        "fsdp_param_dtype": "parallel.fsdp_param_dtype", "init_backbone": "init.backbone",
        "head_warmup_iters": "init.head_warmup_iters", "registered_model_name": "publish.registered_model_name"}

    output_dir: str = "outputs/pretrain"
    """Checkpoints (``<output_dir>/checkpoints``), the exported backbone and ``metrics.json``."""
    log_every: int = 10
    """Steps between logged metrics (and the progress bar's postfix)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: this rank's GPU when there is one, else the CPU."""
    max_steps: int = 0
    """Stop after this many steps of this invocation, with a checkpoint (0: run to the schedule's end)."""
    deterministic: bool = False
    """Deterministic torch kernels (components/train/determinism.py): the same data, params and code give
    the same weights bit for bit on one machine, at about 10% of the step rate on a 2-core CPU. Off is the
    official code's behaviour; the DVC stages' params turn it on so that ``dvc.lock`` reproduces."""

    def validate(self) -> None:
        if self.log_every < 1 or self.max_steps < 0:
            raise ValueError("log_every must be >= 1 and max_steps >= 0")


@dataclass
class CheckpointConfig:
    """When and where checkpoints are written (params section ``checkpoint``; docs/checkpoints.md)."""

    every: int = 1000
    """Steps between checkpoints; the last step of an invocation always gets one."""
    keep_last: int = 3
    """Complete checkpoints kept locally; older ones are pruned after each save."""
    store_prefix: str = ""
    """Mirror every committed checkpoint to the project's object store under this key prefix (empty: off);
    a run whose local checkpoint folder is empty (a new machine) resumes from the newest mirrored one."""
    log_to_mlflow: bool = True
    """Also log the final full checkpoint (student, teacher, heads, optimizer) as MLflow artifacts of the
    run, so training can be continued (or distilled through the heads) from the registry's lineage; turn
    off for models whose checkpoint is very large."""
    on_config_change: Literal["restart", "error", "resume"] = "restart"
    """What a run does when the newest checkpoint in its folder belongs to a run with another identity
    (other training data, crops, objective, schedule, initial weights or architecture;
    components/train/run_identity.py): ``restart`` moves that run's checkpoints aside, to
    ``checkpoints/superseded/<identity digest>/``, and trains from step 0 (so ``dvc repro`` after a params or
    curation change retrains); ``error`` stops with the changed keys named; ``resume`` continues from it
    anyway, as the official code does (an architecture change still stops: the tensors would not fit)."""

    def validate(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ValueError("every and keep_last must be >= 1")
        if self.on_config_change not in ("restart", "error", "resume"):
            raise ValueError(f"on_config_change must be 'restart', 'error' or 'resume', got {self.on_config_change!r}")


@dataclass
class ParallelConfig:
    """Data parallelism across ranks (params section ``parallel``; components/train/parallel.py)."""

    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """``ddp``: a full replica per rank and one flat gradient all-reduce; ``fsdp``: FSDP2 sharding of
    student and teacher (gradients reduce-scattered, optimizer state sharded); ``auto``: fsdp when the
    world size is > 1 on CUDA, else ddp. A single process never shards."""
    fsdp_param_dtype: Literal["bf16", "fp32"] = "bf16"
    """FSDP parameter dtype for forward / backward (the MixedPrecisionPolicy's param_dtype; gradients are
    reduced in fp32 and the sharded master weights stay fp32). bf16 is meant for GPUs; fp32 on CPU/gloo."""


@dataclass
class InitConfig:
    """Continued pretraining from existing weights (params section ``init``)."""

    backbone: str = ""
    """Start student and teacher backbones from these weights: a dinoflow backbone folder, a
    .safetensors / .pth state_dict, an official training checkpoint or ``hub:<name>`` (empty: random)."""
    head_warmup_iters: int = 0
    """Steps with the backbone frozen (lr 0) while the new heads warm up."""

    def validate(self) -> None:
        if self.head_warmup_iters < 0:
            raise ValueError("head_warmup_iters must be >= 0")


@dataclass
class PublishConfig:
    """What the stage registers when training finishes (params section ``publish``)."""

    registered_model_name: str = "dinoflow-backbone"
    """The MLflow registered model that gets the exported backbone as a new version (alias challenger)."""

    def validate(self) -> None:
        if not self.registered_model_name:
            raise ValueError("registered_model_name must name a registered model")


@dataclass
class PretrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    highres: HighResConfig = field(default_factory=HighResConfig)
    run: RunConfig = field(default_factory=RunConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    publish: PublishConfig = field(default_factory=PublishConfig)

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
