"""SwiGLU feed-forward network as the official ``SwiGLUFFNFused`` (the FFN of DINOv2's ViT-g/14).

``w12`` produces the gate and value halves in one matmul; ``w3`` projects back. The hidden width is
shrunk to two thirds of the MLP width (same parameter count as the GELU MLP) and rounded up to a
multiple of 8: ``(int(hidden * 2 / 3) + 7) // 8 * 8``; for ViT-g (1536 * 4 = 6144) that is 4096.

Simplification vs. the official code: always the plain PyTorch expression, never xformers' fused
SwiGLU kernel (same math and parameter names ``w12``/``w3``, so weights are interchangeable).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def swiglu_hidden_features(mlp_hidden_features: int) -> int:
    """Hidden width of the fused SwiGLU FFN that replaces an MLP of ``mlp_hidden_features``."""
    return (int(mlp_hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFNFused(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.hidden_features = swiglu_hidden_features(hidden_features)
        self.w12 = nn.Linear(in_features, 2 * self.hidden_features, bias=bias)
        self.w3 = nn.Linear(self.hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)  # each (..., hidden); the first half is the gate
        return self.w3(F.silu(gate) * value)  # (..., D)
