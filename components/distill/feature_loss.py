"""Feature-space distillation terms: teacher patch grids resized to the student's, and the distances.

Used when the teacher has no heads (official releases, exported backbone folders): the student's CLS
and patch tokens go through learned linear projections (student dim -> teacher dim) and are pulled
towards the teacher's normalised tokens of the same view.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor

Distance = Literal["cosine", "smooth_l1"]


def resize_patch_grid(tokens: Tensor, source: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """``(B, h*w, D)`` patch tokens on the ``source`` grid -> ``(B, H*W, D)`` on ``target``, bilinear.

    Needed when teacher and student patch sizes differ (e.g. a /14 teacher and a /16 student on the same
    crop); half-pixel centres (``align_corners=False``) so both grids cover the same image area.
    """
    if source == target:
        return tokens
    batch, n, dim = tokens.shape
    if n != source[0] * source[1]:
        raise ValueError(f"{n} tokens do not form a {source[0]}x{source[1]} grid")
    grid = tokens.transpose(1, 2).reshape(batch, dim, source[0], source[1])  # (B, D, h, w)
    resized = F.interpolate(grid.float(), size=target, mode="bilinear", align_corners=False)  # (B, D, H, W)
    return resized.flatten(2).transpose(1, 2).to(tokens.dtype)  # (B, H*W, D)


def feature_distance(student: Tensor, teacher: Tensor, distance: Distance, beta: float = 1.0) -> Tensor:
    """Mean distance between matching rows of ``student`` and ``teacher`` ``(..., D)``: a 0-d tensor.

    ``cosine``: mean of ``1 - cos``, blind to scale (the teacher's LayerNorm output scale is not something a
    narrow student must copy); ``smooth_l1``: mean over elements, also matches the scale.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    if distance == "cosine":
        return (1.0 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    if distance == "smooth_l1":
        return F.smooth_l1_loss(student.float(), teacher.float(), beta=beta)
    raise ValueError(f"unknown distance {distance!r}")
