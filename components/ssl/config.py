"""Typed parameters of the self-supervised objective (``params/pretrain.yaml`` sections ``dino``,
``ibot``, ``teacher``, ``optim``), with the official defaults (ssl_default_config.yaml).

The official configs count epochs of 1,250 iterations; these fields count iterations. The paper's
long recipe (ViT-L/g) differs from the default in: Sinkhorn-Knopp centering, K=131,072 prototypes,
bottleneck 384, a separate iBOT head, teacher momentum 0.994, weight decay end 0.2, layer-wise decay
1.0 (see params/presets/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

OFFICIAL_EPOCH_LENGTH = 1250

# fp16 gradients underflow without loss scaling (the official code uses a sharded grad scaler); dinoflow has
# none, so it refuses fp16 rather than train silently wrong. bf16 has fp32's range and needs no scaler.
FP16_REFUSAL = ("precision 'fp16' is not supported for training: it needs gradient loss scaling, which dinoflow "
                "does not implement; use 'bf16' (the GPU default, same range as fp32), 'auto' or 'fp32'")


@dataclass
class HeadConfig:
    n_prototypes: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    # Prototype gains weight_g fixed to 1 (DINO v1 and this project's spec); the official DINOv2 head
    # fills them with 1 but leaves them trainable: set false to reproduce that exactly.
    norm_last_layer: bool = True

    def validate(self) -> None:
        if min(self.n_prototypes, self.hidden_dim, self.bottleneck_dim, self.nlayers) < 1:
            raise ValueError("head sizes must be >= 1")


@dataclass
class DinoObjectiveConfig:
    loss_weight: float = 1.0
    koleo_loss_weight: float = 0.1
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class IbotObjectiveConfig:
    loss_weight: float = 1.0
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    separate_head: bool = False  # untied DINO and iBOT heads (the paper's long recipe)
    head: HeadConfig = field(default_factory=HeadConfig)

    def validate(self) -> None:
        low, high = self.mask_ratio_min_max
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"mask_ratio_min_max must satisfy 0 <= min <= max <= 1, got {self.mask_ratio_min_max}")
        if not 0.0 <= self.mask_sample_probability <= 1.0:
            raise ValueError("mask_sample_probability must be in [0, 1]")


@dataclass
class TeacherConfig:
    centering: Literal["centering", "sinkhorn_knopp"] = "sinkhorn_knopp"
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iters: int = 30 * OFFICIAL_EPOCH_LENGTH
    student_temp: float = 0.1
    center_momentum: float = 0.9


@dataclass
class OptimConfig:
    iterations: int = 100 * OFFICIAL_EPOCH_LENGTH
    warmup_iters: int = 10 * OFFICIAL_EPOCH_LENGTH
    base_lr: float = 0.004  # scaled by the rule below with the global batch size
    scaling_rule: Literal["sqrt_wrt_1024", "linear_wrt_256", "none"] = "sqrt_wrt_1024"
    min_lr: float = 1.0e-6
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0  # per student module (backbone, each head); 0 disables
    freeze_last_layer_iters: int = OFFICIAL_EPOCH_LENGTH
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999

    def validate(self) -> None:
        if self.iterations < 1:
            raise ValueError("iterations must be >= 1")
        if self.warmup_iters > self.iterations or self.freeze_last_layer_iters > self.iterations:
            raise ValueError("warmup_iters and freeze_last_layer_iters must not exceed iterations")
        if min(self.warmup_iters, self.freeze_last_layer_iters) < 0:
            raise ValueError("warmup_iters and freeze_last_layer_iters must be >= 0")


@dataclass
class ObjectiveConfig:
    dino: DinoObjectiveConfig = field(default_factory=DinoObjectiveConfig)
    ibot: IbotObjectiveConfig = field(default_factory=IbotObjectiveConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # Autocast dtype of the forward passes; "auto": bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX),
    # fp32 elsewhere (components/ssl/meta_arch.resolve_precision). "fp16" is refused (see FP16_REFUSAL).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "bf16"
    packed_forward: bool = True  # all crops through the backbone as one variable-length batch

    def validate(self) -> None:
        if self.precision == "fp16":
            raise ValueError(FP16_REFUSAL)
