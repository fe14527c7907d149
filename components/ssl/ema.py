"""The EMA teacher update (paper §4: the teacher is an exponential moving average of the student).

``teacher = m * teacher + (1 - m) * student`` on every parameter, with fused foreach kernels. Works
on sharded parameters as long as teacher and student share the same sharding (each rank updates its
own shard), which is how the pretraining engine builds them.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """In-place EMA of ``student``'s parameters into ``teacher``'s (same structure required)."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    student_params = dict(student.named_parameters())
    teacher_params = dict(teacher.named_parameters())
    if student_params.keys() != teacher_params.keys():
        missing = sorted(student_params.keys() ^ teacher_params.keys())[:5]
        raise ValueError(f"student and teacher parameters differ: {missing}")
    names = list(student_params)
    t = [_local(teacher_params[n]) for n in names]
    s = [_local(student_params[n]) for n in names]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def _local(param: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself."""
    to_local = getattr(param, "to_local", None)
    return to_local() if callable(to_local) else param.data
