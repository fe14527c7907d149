"""Sinkhorn-Knopp teacher targets (DINOv2 §4, "Sinkhorn-Knopp centering").

DINOv2 replaces the DINO/iBOT teacher softmax-centering by the Sinkhorn-Knopp batch normalisation of
SwAV (Caron et al. 2020, §3.1 "Online clustering"): the teacher scores of a batch, ``exp(logits / T)``,
are alternately rescaled so that every prototype receives the same total mass over the *global*
batch and every sample is a distribution over prototypes. Three iterations, as the paper and the
official ``SinkhornKnopp`` teacher.

Writing ``Q`` for the (K, B) matrix (prototypes x samples, the paper's notation), one iteration is::

    Q <- Q / rowsum(Q) / K        # rowsum all-reduced: each prototype gets 1/K of the global mass
    Q <- Q / colsum(Q) / B_glob   # column sums are local: each sample gets 1/B_glob

and the result ``B_glob * Q`` has columns summing to one (one distribution per sample). ``B_glob`` is
the number of samples over all processes (``world_size * B`` for DINO, the all-reduced number of
masked patches for iBOT, where ranks hold different numbers of tokens).

Differences from the official code, on purpose (none changes the result beyond float rounding):
- the scores are shifted by the global maximum logit before ``exp``; a constant factor cancels in the
  first normalisation, so the targets are unchanged, but ``exp`` cannot overflow for large
  ``logits / T`` (the official code would return NaN there). This costs one scalar all-reduce;
- the count of samples is summed into a copy: the official iBOT teacher all-reduces the caller's
  ``n_masked_patches_tensor`` in place (and without checking for a process group);
- inputs below float32 are computed in float32 (as the official ``.float()``); float64 inputs stay
  float64 so tests can compare against a float64 reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

from components.ssl.all_reduce import all_reduce_max_, all_reduce_sum_, world_size


def global_sample_count(n_samples: Tensor | int | None, local_count: int, like: Tensor) -> Tensor:
    """Number of samples over all processes, as a scalar tensor with ``like``'s dtype and device.

    ``n_samples`` is *this process's* count (a 0-d/1-element tensor or an int), summed over processes;
    None means ``local_count`` on every process, i.e. ``world_size * local_count`` (the DINO case).
    The sum is done in int64 so counts are exact.
    """
    if n_samples is None:
        return torch.tensor(float(local_count * world_size()), device=like.device, dtype=like.dtype)
    if isinstance(n_samples, Tensor):
        count = n_samples.detach().to(device=like.device, dtype=torch.int64).reshape(()).clone()
    else:
        count = torch.tensor(int(n_samples), device=like.device, dtype=torch.int64)
    return all_reduce_sum_(count).to(like.dtype)


def global_max(values: Tensor) -> Tensor:
    """Largest entry of ``values`` over all processes (a 0-d tensor; -inf if every process is empty)."""
    local = values.amax() if values.numel() > 0 else values.new_full((), float("-inf"))
    return all_reduce_max_(local.clone())


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: Tensor,
    teacher_temp: float,
    n_iterations: int = 3,
    n_samples: Tensor | int | None = None,
) -> Tensor:
    """Balanced soft assignments of the samples of a (distributed) batch to the prototypes.

    Args:
        teacher_logits: (B, K) teacher head outputs of this process's samples.
        teacher_temp: sharpening temperature ``T`` of ``exp(logits / T)``.
        n_iterations: alternating row/column normalisations (3 in DINOv2).
        n_samples: this process's number of samples when it must be counted explicitly (iBOT's
            ``n_masked_patches_tensor``); summed over processes. None: ``world_size * B``.

    Returns:
        (B, K) targets in float32 (float64 for float64 input), no gradient; each row sums to one
        when ``n_iterations >= 1``.
    """
    compute_dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    scaled = teacher_logits.detach().to(compute_dtype) / teacher_temp  # (B, K)
    n_global = global_sample_count(n_samples, scaled.shape[0], scaled)
    n_prototypes = scaled.shape[1]

    q = torch.exp(scaled - global_max(scaled)).t()  # (K, B): the paper's prototypes x samples layout
    q /= all_reduce_sum_(q.sum())  # the whole (global) matrix sums to one
    for _ in range(n_iterations):
        q /= all_reduce_sum_(q.sum(dim=1, keepdim=True))  # (K, 1) global mass of each prototype
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)  # (1, B) a sample's column lives on one process: no reduce
        q /= n_global
    q *= n_global  # columns now sum to one: one distribution per sample
    return q.t()  # (B, K)
