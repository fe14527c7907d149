"""iBOT masked-patch loss (DINOv2 §4 "Patch-level objective"; the L_MIM loss of iBOT, Zhou et al. 2022).

Some patches of the student's global crops are masked (replaced by a learnt mask token); the
teacher sees the same crops unmasked. For every masked patch the student's patch-head scores must
match the teacher's distribution at that position::

    L_iBOT = (1 / n_images) * sum_images (1 / n_masked(image)) * sum_{masked p of image}
             -sum_k p_t(p)_k log softmax(s(p) / T_s)_k

so each image weighs the same whatever its number of masked patches, and images without a masked
patch count in ``n_images`` with a zero term. This is the official ``forward_masked``: the per-token
weight ``masks_weight = 1 / mask.sum(-1).clamp(min=1)`` of its image (precomputed by the official
collate function), a sum over masked tokens, and a division by ``student_masks_flat.shape[0]``, the
number of global-crop images on this process. The official meta-architecture then multiplies by
``loss_scales * ibot_loss_scale = 2 * 1/2 = 1``.

Teacher targets: :meth:`iBOTPatchLoss.softmax_center_teacher` (EMA center over masked tokens) or
:meth:`iBOTPatchLoss.sinkhorn_knopp_teacher`, whose column normalisation uses the number of masked
patches summed over processes (ranks hold different numbers).

Differences from the official code, on purpose:
- the cross-entropy is computed in at least float32 (as the official xformers path; its fallback
  path uses the input dtype);
- ``n_masked_patches`` truncates student and teacher rows before the cross-entropy instead of the
  per-token losses afterwards (same result, and padded student rows need not match the teacher's);
- the center buffer keeps the official (1, 1, K) shape, but (M, K) inputs are accepted everywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from components.ssl.centering import TeacherCentering
from components.ssl.cross_entropy import teacher_student_cross_entropy
from components.ssl.sinkhorn import sinkhorn_knopp


def masked_token_weights(student_masks_flat: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Weight ``1 / n_masked(image)`` of every masked token, in the row-major order of the mask. (M,)

    Images without masked tokens contribute no token (their clamp(min=1) only avoids a 0/0).
    """
    masks = student_masks_flat.bool()  # (B, N)
    per_image = 1.0 / masks.sum(dim=-1).clamp(min=1).to(dtype)  # (B,)
    return per_image.unsqueeze(-1).expand_as(masks)[masks]  # (M,)


class iBOTPatchLoss(TeacherCentering):  # the official (lower-case) name, so ported code reads the same
    """Cross-entropy between teacher and student prototype distributions on masked patches.

    Holds the teacher's EMA center over masked tokens (buffer ``center`` (1, 1, K), as official).

    Args:
        patch_out_dim: number of prototypes K of the patch head.
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the center (0.9).
    """

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__(patch_out_dim, center_momentum=center_momentum, center_shape=(1, 1, patch_out_dim))
        self.student_temp = student_temp

    def sinkhorn_knopp_teacher(
        self,
        teacher_output: Tensor,
        teacher_temp: float,
        n_masked_patches_tensor: Tensor | int | None = None,
        n_iterations: int = 3,
    ) -> Tensor:
        """Sinkhorn-Knopp targets (M, K) for this process's masked tokens.

        ``n_masked_patches_tensor`` is this process's number of masked tokens (the collate function's
        ``n_masked_patches``), summed over processes here; None counts ``teacher_output``'s rows.
        The caller's tensor is not modified.
        """
        count = teacher_output.shape[0] if n_masked_patches_tensor is None else n_masked_patches_tensor
        return sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=n_iterations, n_samples=count)

    def forward(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, student_masks_flat: Tensor
                ) -> Tensor:
        """Dense form: (B, N, K) student logits and teacher distributions, (B, N) mask -> 0-d loss.

        Mean over masked tokens of each image, then mean over images (equal to :meth:`forward_masked`).
        """
        masks = student_masks_flat.bool()  # (B, N)
        per_token = teacher_student_cross_entropy(teacher_patch_tokens, student_patch_tokens, self.student_temp)
        per_image = (per_token * masks).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1)  # (B,)
        return per_image.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Loss on the gathered masked tokens, with the official per-image weighting.

        Args:
            student_patch_tokens_masked: (M', K) student logits of the masked tokens (M' >= M if padded).
            teacher_patch_tokens_masked: (M'', K) teacher distributions of the same tokens.
            student_masks_flat: (B, N) bool masks of this process's global-crop images.
            n_masked_patches: keep the first M rows only (the official upper-bound padding).
            masks_weight: (M,) per-token weights; default ``1 / n_masked(image)`` from the masks.

        Returns:
            0-d tensor ``sum_tokens weight * CE / B``.
        """
        keep = student_patch_tokens_masked.shape[0] if n_masked_patches is None else n_masked_patches
        student = student_patch_tokens_masked[:keep]  # (M, K)
        teacher = teacher_patch_tokens_masked[:keep]  # (M, K)
        per_token = teacher_student_cross_entropy(teacher, student, self.student_temp)  # (M,)
        if masks_weight is None:
            masks_weight = masked_token_weights(student_masks_flat, dtype=per_token.dtype)
        if not (student.shape[0] == teacher.shape[0] == masks_weight.shape[0]):
            raise ValueError(f"student ({student.shape[0]}), teacher ({teacher.shape[0]}) and weights "
                             f"({masks_weight.shape[0]}) must describe the same masked tokens")
        return (per_token * masks_weight).sum() / student_masks_flat.shape[0]
