"""Stochastic depth (Huang et al. 2016) in the two forms the official DINOv2 blocks use.

* :class:`DropPath`: per-sample Bernoulli mask on the residual branch, survivors scaled by
  ``1 / keep``; the residual is still computed for every sample.
* The efficient batch-subset form (DINOv2, arXiv 2304.07193, Sec. 5, "Efficient stochastic depth"): the
  residual is computed only on a random subset of ``max(int(B * (1 - rate)), 1)`` samples and added
  back scaled by ``B / subset``, so dropped samples cost no compute. In expectation both forms add
  the full residual. The official block uses it above rate 0.1 for single tensors and for any
  positive rate in the list (packed) forward; the packed version draws one subset per crop group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from components.models.layers.packing import PackedLayout


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Zero the whole residual of each sample with probability ``drop_prob``; rescale the rest."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # (B, 1, ..., 1)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def random_batch_subset(batch_size: int, drop_rate: float, device: torch.device) -> tuple[Tensor, float]:
    """Indices of the samples that keep their residual, and the compensating scale ``B / subset``."""
    subset_size = max(int(batch_size * (1 - drop_rate)), 1)
    indices = torch.randperm(batch_size, device=device)[:subset_size]
    return indices, batch_size / subset_size


def drop_add_residual_subset(x: Tensor, residual_fn: Callable[[Tensor], Tensor], drop_rate: float) -> Tensor:
    """``x + residual_fn(x)`` with the batch-subset stochastic depth; ``x`` is ``(B, N, D)``."""
    indices, scale = random_batch_subset(x.shape[0], drop_rate, x.device)
    residual = residual_fn(x[indices])  # (S, N, D)
    out = torch.index_add(x.flatten(1), 0, indices, residual.flatten(1).to(x.dtype), alpha=scale)  # (B, N*D)
    return out.view_as(x)


def drop_add_residual_subset_packed(
    x: Tensor,
    layout: PackedLayout,
    residual_fn: Callable[[Tensor, PackedLayout], Tensor],
    drop_rate: float,
) -> Tensor:
    """Batch-subset stochastic depth on a packed ``(T, D)`` batch: one subset per crop group.

    The kept sequences of every group are packed together so the residual branch still runs as a
    single packed call, as in the official ``drop_add_residual_stochastic_depth_list``.
    """
    groups = layout.unpack(x)  # each (B_i, N_i, D)
    subsets = [random_batch_subset(g.shape[0], drop_rate, x.device) for g in groups]
    kept = [g[indices] for g, (indices, _) in zip(groups, subsets, strict=True)]  # each (S_i, N_i, D)
    kept_layout = layout.with_batch_sizes([k.shape[0] for k in kept])
    residuals = kept_layout.unpack(residual_fn(kept_layout.pack(kept), kept_layout))  # each (S_i, N_i, D)
    updated = [
        torch.index_add(g.flatten(1), 0, indices, r.flatten(1).to(x.dtype), alpha=scale).view_as(g)
        for g, r, (indices, scale) in zip(groups, residuals, subsets, strict=True)
    ]
    return layout.pack(updated)  # (T, D)
