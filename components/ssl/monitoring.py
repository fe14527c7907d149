"""Collapse monitors for self-supervised training (logged every step by the engine).

- Teacher target entropy: ``ln K`` means uniform targets (no signal yet, or collapse to uniform);
  near 0 means one prototype wins everywhere (collapse to a point).
- Std of L2-normalised CLS features across the batch, averaged over dimensions: 0 means every image
  maps to the same vector; about ``1/sqrt(D)`` means features spread over the sphere (the yardstick
  from SimSiam, Chen & He 2021).
"""

from __future__ import annotations

import math

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
