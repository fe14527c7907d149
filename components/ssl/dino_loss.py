"""DINO image-level loss (DINOv2 §4 "Image-level objective"; DINO §3.1, eq. 3 for the multi-crop pairs).

The student's CLS-token prototype scores of every crop are trained to match the teacher's
distribution on the *other* global crops::

    L_DINO = sum over pairs (student crop v, teacher global crop u), v != u of
             mean_b  -sum_k p_t(u)_bk log softmax(s(v)_b / T_s)_k

The teacher distribution ``p_t`` comes from :meth:`DINOLoss.softmax_center_teacher` (EMA centering)
or :meth:`DINOLoss.sinkhorn_knopp_teacher` (DINOv2's default); neither carries a gradient.

Official normalisation (``ssl_meta_arch.forward_backward``), reproduced by :func:`dino_cross_view_loss`:
with ``n_g`` global and ``n_l`` local crops, ``n_terms = n_g (n_g - 1) + max(n_l n_g, 1)``;
- local term: every local crop against every teacher global crop, summed, divided by ``n_terms``;
- global term: global crop i against the teacher of every other global crop j != i (the official code
  swaps the two teacher chunks so A meets B; no crop is compared with itself), divided by ``n_terms``.
The official code computes the global term on the concatenated (2B, K) crops, averages over 2B and
multiplies by 2 (``loss_scales``); that is the same sum of per-pair batch means.
Note the ``max(., 1)``: without local crops the global term is divided by 2 + 1 = 3, not by 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from components.ssl.centering import TeacherCentering
from components.ssl.cross_entropy import student_log_probs
from components.ssl.sinkhorn import sinkhorn_knopp


class DINOLoss(TeacherCentering):
    """Cross-entropy between teacher distributions and student tempered softmaxes over crop pairs.

    Holds the teacher's EMA center (buffer ``center`` (1, K), as the official ``DINOLoss``).

    Args:
        out_dim: number of prototypes K.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the center (0.9).
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__(out_dim, center_momentum=center_momentum)
        self.student_temp = student_temp

    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Sinkhorn-Knopp teacher targets (B, K) over the global batch of ``world_size * B`` samples."""
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations)

    def forward(self, student_output_list: Sequence[Tensor], teacher_out_softmaxed_centered_list: Sequence[Tensor]
                ) -> Tensor:
        """Sum over every (student, teacher) pair of the batch-mean cross-entropy.

        Args:
            student_output_list: student head outputs, one (B, K) tensor per crop (logits).
            teacher_out_softmaxed_centered_list: teacher distributions, one (B, K) tensor per crop
                (a (n, B, K) tensor iterates the same way).

        Returns:
            0-d tensor, un-normalised: the caller divides by the number of terms (see module doc).
        """
        if len(student_output_list) == 0 or len(teacher_out_softmaxed_centered_list) == 0:
            raise ValueError("DINOLoss needs at least one student and one teacher output")
        total: Tensor | None = None
        for student_logits in student_output_list:
            log_probs = student_log_probs(student_logits, self.student_temp)  # (B, K), computed once per crop
            for teacher_probs in teacher_out_softmaxed_centered_list:
                pair = -(teacher_probs * log_probs).sum(dim=-1).mean()  # mean over the batch
                total = pair if total is None else total + pair
        assert total is not None
        return total


def dino_n_loss_terms(n_global_crops: int, n_local_crops: int) -> int:
    """The official normaliser ``n_g (n_g - 1) + max(n_l n_g, 1)`` of both DINO terms."""
    return n_global_crops * (n_global_crops - 1) + max(n_local_crops * n_global_crops, 1)


class DINOCrossViewLosses(NamedTuple):
    """The two DINO terms as the official code logs and sums them (each already divided by ``n_loss_terms``)."""

    local_crops_loss: Tensor
    global_crops_loss: Tensor
    n_loss_terms: int


def dino_cross_view_loss(
    dino_loss: DINOLoss,
    student_global: Sequence[Tensor],
    student_local: Sequence[Tensor],
    teacher_global_probs: Sequence[Tensor],
) -> DINOCrossViewLosses:
    """The official pairing and normalisation of the DINO loss over global and local crops.

    Args:
        dino_loss: supplies the student temperature.
        student_global: student logits of each global crop, ``n_g`` tensors (B, K).
        student_local: student logits of each local crop, ``n_l`` tensors (B, K) (may be empty).
        teacher_global_probs: teacher distributions of each global crop **in crop order** (entry i is
            the teacher's view of global crop i). Do not pre-swap them: the pairing with the *other*
            crops is done here. (Both teacher normalisations act per sample, or are equivariant to the
            sample order for Sinkhorn-Knopp, so swapping before or after them is the same.)

    Returns:
        ``(local_crops_loss, global_crops_loss, n_loss_terms)``; the DINO objective is their sum
        (times ``dino.loss_weight``). Without local crops the local term is a zero tensor.
    """
    n_global, n_local = len(student_global), len(student_local)
    if n_global == 0 or len(teacher_global_probs) != n_global:
        raise ValueError(f"need one teacher output per global crop, got {len(teacher_global_probs)} for {n_global}")
    n_terms = dino_n_loss_terms(n_global, n_local)

    loss_dtype = torch.promote_types(student_global[0].dtype, torch.float32)  # as student_log_probs
    zero = student_global[0].new_zeros((), dtype=loss_dtype)
    local_loss = dino_loss(student_local, teacher_global_probs) / n_terms if n_local > 0 else zero

    global_loss = zero
    for i, student_logits in enumerate(student_global):
        other_views = [teacher for j, teacher in enumerate(teacher_global_probs) if j != i]
        if other_views:  # a single global crop has no cross-view partner
            global_loss = global_loss + dino_loss([student_logits], other_views)
    return DINOCrossViewLosses(local_loss, global_loss / n_terms, n_terms)
