"""Teacher centering and sharpening with an EMA center (DINO §3.1 "Avoiding collapse", eq. 4; DINOv2 §4).

The teacher distribution is ``softmax((t - c) / T_teacher)``: subtracting the center ``c`` prevents
one prototype from dominating, a low teacher temperature prevents the uniform collapse. The center is
an exponential moving average of the teacher outputs over the global batch::

    c <- m * c + (1 - m) * mean_over_all_processes(teacher_outputs)      (m = 0.9)

DINOv2 keeps this "centering" mode as an alternative to Sinkhorn-Knopp (``train.centering`` in the
official config). This module is the base of :class:`~components.ssl.dino_loss.DINOLoss` and
:class:`~components.ssl.ibot_loss.iBOTPatchLoss`, so their buffer keeps the official state-dict key
``center`` (``dino_loss.center`` / ``ibot_patch_loss.center``).

As the official code, the update is *lazy*: :meth:`TeacherCentering.update_center` starts an
asynchronous all-reduce of the batch mean and returns; the EMA step is applied at the next
:meth:`TeacherCentering.softmax_center_teacher` (or an explicit :meth:`apply_center_update`), so the
communication overlaps the student's forward pass. Within a training step the teacher is always
centered with the center of the *previous* steps, exactly as the official step (softmax first,
update second). Call :meth:`apply_center_update` before saving a checkpoint to include the last batch
(the official code has the same one-step lag in its checkpoints).

Differences from the official code, on purpose:
- the batch mean is taken per process, then averaged over processes. For iBOT this is the official
  formula; for DINO the official code divides the global sum by ``world_size * local_batch``, which
  is the same number whenever every process holds the same batch size (the official loader drops
  the last incomplete batch), and stays consistent across processes otherwise;
- the mean is accumulated in at least float32 whatever the teacher dtype (the official code sums in
  the teacher's dtype, fp16 under its mixed precision);
- the center is subtracted as a (K,) vector, so (B, K), (M, K) and (1, M, K) inputs all work and keep
  their shape; the official iBOT loss needs its (1, M, K) layout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from components.ssl.all_reduce import start_all_reduce_sum_


class TeacherCentering(nn.Module):
    """EMA center of teacher outputs over the global batch, and the centered, sharpened teacher softmax.

    Args:
        out_dim: number of prototypes K.
        center_momentum: EMA momentum m (0.9 in DINO/DINOv2).
        center_shape: shape of the ``center`` buffer, default (1, K); the iBOT loss uses the official
            (1, 1, K) so its checkpoints load.
    """

    center: Tensor

    def __init__(self, out_dim: int, center_momentum: float = 0.9, center_shape: tuple[int, ...] | None = None) -> None:
        super().__init__()
        shape = center_shape if center_shape is not None else (1, out_dim)
        if shape[-1] != out_dim or int(torch.Size(shape).numel()) != out_dim:
            raise ValueError(f"center_shape {shape} must hold exactly out_dim={out_dim} values in its last axis")
        self.out_dim = out_dim
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(shape))
        # A started-but-not-applied update: (per-process batch mean, 1) being summed over processes, and
        # the collective's handle.
        self._pending_batch_mean: Tensor | None = None
        self._pending_handle: dist.Work | None = None

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((teacher_output - center) / teacher_temp)`` over the last axis, shape kept.

        Applies any pending center update first. The result has at least the center's dtype (float32).
        """
        self.apply_center_update()
        centered = teacher_output - self.center.reshape(self.out_dim)  # (..., K), promoted to >= float32
        return F.softmax(centered / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """Start the EMA update with this batch's teacher outputs (..., K); applied lazily.

        The batch mean over every leading axis is summed over processes asynchronously, with a count of the
        processes that had outputs. Every process must call it (it is a collective); one with no outputs
        (a rank whose global crops drew no iBOT mask) contributes nothing, and the center is the mean over
        the others (over all of them, the official formula, whenever every process has outputs).
        """
        if self._pending_batch_mean is not None:
            self.apply_center_update()  # never drop a started update
        accumulate_dtype = torch.promote_types(teacher_output.dtype, self.center.dtype)
        tokens = teacher_output.detach().reshape(-1, self.out_dim).to(accumulate_dtype)  # (N, K)
        # The mean of nothing is NaN and would poison the center: an empty batch votes 0 and adds zeros.
        has_outputs = tokens.shape[0] > 0
        batch_mean = tokens.mean(dim=0) if has_outputs else tokens.new_zeros(self.out_dim)  # (K,)
        # (K + 1,): the mean and this process's vote, summed over processes in one collective.
        summed = torch.cat((batch_mean, batch_mean.new_full((1,), float(has_outputs))))
        self._pending_handle = start_all_reduce_sum_(summed)
        self._pending_batch_mean = summed

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Finish a started update: wait for the all-reduce, then ``c <- m c + (1 - m) mean``. No-op if none."""
        if self._pending_batch_mean is None:
            return
        if self._pending_handle is not None:
            self._pending_handle.wait()
        summed, contributors = self._pending_batch_mean[:-1], float(self._pending_batch_mean[-1])
        self._pending_batch_mean = None
        self._pending_handle = None
        if contributors == 0:  # no process had outputs: nothing to average
            return
        global_mean = (summed / contributors).reshape(self.center.shape)
        momentum = self.center_momentum
        self.center.mul_(momentum).add_(global_mean.to(self.center.dtype), alpha=1.0 - momentum)
