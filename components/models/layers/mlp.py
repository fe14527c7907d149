"""Two-layer GELU MLP, the ViT feed-forward network (official names ``fc1``, ``fc2``).

Simplification vs. the official ``Mlp``: no dropout layers (the official backbone uses rate 0).
"""

from __future__ import annotations

from torch import Tensor, nn


class Mlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()  # exact (erf) GELU, as the official nn.GELU default
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))  # (..., D) -> (..., hidden) -> (..., D)
