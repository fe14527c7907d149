"""LayerScale (Touvron et al., CaiT): a learned per-channel scale on each residual branch.

DINOv2 uses it on every block with initial value 1e-5 (``student.layerscale`` in the official config).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma  # (..., D) * (D,)
