"""The block's feed-forward network, chosen by name as the official ``ffn_layer`` argument.

``"swiglu"`` and ``"swiglufused"`` both build :class:`SwiGLUFFNFused`, as the official
``DinoVisionTransformer`` does; ``"identity"`` drops the FFN (no parameters).
"""

from __future__ import annotations

from typing import Literal, get_args

from torch import nn

from components.models.layers.mlp import Mlp
from components.models.layers.swiglu import SwiGLUFFNFused

FfnLayer = Literal["mlp", "swiglufused", "swiglu", "identity"]


def build_ffn(kind: FfnLayer, dim: int, mlp_ratio: float, bias: bool = True) -> nn.Module:
    hidden = int(dim * mlp_ratio)
    if kind == "mlp":
        return Mlp(dim, hidden, bias=bias)
    if kind in ("swiglufused", "swiglu"):
        return SwiGLUFFNFused(dim, hidden, bias=bias)
    if kind == "identity":
        return nn.Identity()
    raise ValueError(f"unknown ffn_layer {kind!r}; expected one of {get_args(FfnLayer)}")
