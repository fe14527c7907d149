"""Per-iteration schedules of the DINOv2 recipe (paper §4 "Implementation details", and the
official ``CosineScheduler``): lr, weight decay, teacher momentum, teacher temperature and the
prototype-layer lr, each a frozen phase, a linear warm-up, then a half-cosine to a final value.

The prototype-layer lr is the official one: the lr schedule itself with its first
``freeze_last_layer_iters`` values set to 0 (``schedule[:freeze] = 0`` in the official
``build_schedulers``), not a schedule shifted by the freeze.

The official configs count in "epochs" of 1,250 iterations; dinoflow's params count iterations
directly so short CPU runs and long GPU runs use the same fields.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class CosineSchedule:
    """``value(it)``: 0 for ``freeze_iters``, linear ``start_warmup_value``→``base_value`` over
    ``warmup_iters``, then cosine ``base_value``→``final_value`` until ``total_iters``; after that
    ``final_value``."""

    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __post_init__(self) -> None:
        if min(self.total_iters, self.warmup_iters, self.freeze_iters) < 0:
            raise ValueError("iteration counts must be >= 0")
        if self.freeze_iters + self.warmup_iters > self.total_iters:
            raise ValueError(
                f"freeze ({self.freeze_iters}) + warm-up ({self.warmup_iters}) iterations exceed the "
                f"schedule length ({self.total_iters})"
            )

    def __call__(self, it: int) -> float:
        if it < 0:
            raise ValueError(f"iteration must be >= 0, got {it}")
        if it >= self.total_iters:
            return self.final_value
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            # Matches np.linspace(start, base, warmup_iters) as the official code: reaches base on
            # the last warm-up step (and a one-step warm-up is just the start value).
            if self.warmup_iters == 1:
                return self.start_warmup_value
            frac = it / (self.warmup_iters - 1)
            return self.start_warmup_value + frac * (self.base_value - self.start_warmup_value)
        it -= self.warmup_iters
        cosine_iters = self.total_iters - self.freeze_iters - self.warmup_iters
        progress = it / cosine_iters
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ZeroedPrefix:
    """``schedule(it)``, but 0 for the first ``zero_iters`` iterations (nothing is shifted)."""

    schedule: CosineSchedule
    zero_iters: int

    def __post_init__(self) -> None:
        if self.zero_iters < 0:
            raise ValueError("zero_iters must be >= 0")

    def __call__(self, it: int) -> float:
        value = self.schedule(it)  # validates it
        return 0.0 if it < self.zero_iters else value


def scaled_lr(base_lr: float, global_batch_size: int, rule: str = "sqrt_wrt_1024") -> float:
    """The official lr scaling: ``base_lr * sqrt(global_batch / 1024)`` (or linear / none)."""
    if rule == "sqrt_wrt_1024":
        return base_lr * math.sqrt(global_batch_size / 1024.0)
    if rule == "linear_wrt_256":
        return base_lr * global_batch_size / 256.0
    if rule == "none":
        return base_lr
    raise ValueError(f"unknown lr scaling rule {rule!r}; use sqrt_wrt_1024, linear_wrt_256 or none")


@dataclass(frozen=True)
class TrainingSchedules:
    lr: CosineSchedule
    weight_decay: CosineSchedule
    momentum: CosineSchedule
    teacher_temp: CosineSchedule
    last_layer_lr: ZeroedPrefix  # lr, but 0 while the prototype layer is frozen

    def at(self, it: int) -> dict[str, float]:
        return {
            "lr": self.lr(it),
            "wd": self.weight_decay(it),
            "momentum": self.momentum(it),
            "teacher_temp": self.teacher_temp(it),
            "last_layer_lr": self.last_layer_lr(it),
        }


def build_schedules(
    *,
    total_iters: int,
    lr: float,
    min_lr: float,
    warmup_iters: int,
    weight_decay: float,
    weight_decay_end: float,
    momentum_teacher: float,
    final_momentum_teacher: float,
    teacher_temp: float,
    warmup_teacher_temp: float,
    warmup_teacher_temp_iters: int,
    freeze_last_layer_iters: int,
) -> TrainingSchedules:
    """The five schedules of the official ``build_schedulers`` (lr already scaled)."""
    temp_iters = min(warmup_teacher_temp_iters, total_iters)
    return TrainingSchedules(
        lr=CosineSchedule(lr, min_lr, total_iters, warmup_iters=warmup_iters),
        weight_decay=CosineSchedule(weight_decay, weight_decay_end, total_iters),
        momentum=CosineSchedule(momentum_teacher, final_momentum_teacher, total_iters),
        # Warm-up then constant: the schedule ends with the warm-up and returns the final value after.
        teacher_temp=CosineSchedule(teacher_temp, teacher_temp, temp_iters, warmup_iters=temp_iters,
                                    start_warmup_value=warmup_teacher_temp),
        last_layer_lr=ZeroedPrefix(CosineSchedule(lr, min_lr, total_iters, warmup_iters=warmup_iters),
                                   zero_iters=freeze_last_layer_iters),
    )
