"""Collapse monitors for self-supervised training (logged every step by the engine).

- Teacher target entropy: ``ln K`` means uniform targets (no signal yet, or collapse to uniform);
  near 0 means one prototype wins everywhere (collapse to a point).
- Std of L2-normalised CLS features across the batch, averaged over dimensions: 0 means every image
  maps to the same vector; about ``1/sqrt(D)`` means features spread over the sphere (the yardstick
  from SimSiam, Chen & He 2021).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@torch.no_grad()
def mean_entropy(probs: Tensor) -> float:
    """Mean Shannon entropy (nats) of the rows of ``probs`` (..., K)."""
    p = probs.float().flatten(0, -2)
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


@torch.no_grad()
def normalized_feature_std(features: Tensor) -> float:
    """Std over the batch of L2-normalised features (B, D), averaged over D."""
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    if x.shape[0] < 2:
        return 0.0
    return float(x.std(dim=0).mean())


def uniform_entropy(n_prototypes: int) -> float:
    return math.log(n_prototypes)


@dataclass
class UniformTargetsWatch:
    """Says once when the DINO teacher's targets are still uniform after they should have left it.

    Uniform targets (entropy ln K, within ``tolerance`` nats) mean the CLS objective teaches nothing:
    the student is only pulled towards a constant output. It is normal for the first steps (a fresh
    head maps every image alike); past ``after_step`` (the end of the teacher-temperature warm-up) it
    is the dead head that kept the CPU preset at 77-78% until its teacher settings changed
    (docs/cpu-preset.md). Short runs with the official momentum and temperatures are the usual cause.
    """

    n_prototypes: int
    after_step: int
    tolerance: float = 0.01
    warned: bool = False

    def check(self, step: int, teacher_entropy: float | None) -> str | None:
        """A warning text the first time ``teacher_entropy`` is uniform past ``after_step``, else None."""
        if self.warned or teacher_entropy is None or step < self.after_step:
            return None
        uniform = uniform_entropy(self.n_prototypes)
        if teacher_entropy < uniform - self.tolerance:
            return None
        self.warned = True
        return (f"step {step}: the DINO teacher targets are still uniform (entropy {teacher_entropy:.4f} = ln K "
                f"{uniform:.4f}): the CLS objective gives no signal. Short runs need a faster teacher "
                "(lower objective.teacher.momentum_teacher, lower teacher temperatures; docs/cpu-preset.md)")
