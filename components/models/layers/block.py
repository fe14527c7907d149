"""Pre-norm transformer block with LayerScale and DINOv2's stochastic depth (official names:
``norm1, attn, ls1, norm2, mlp, ls2``).

Residual paths, matching the official ``NestedTensorBlock``:

* single tensor, training, rate > 0.1: batch-subset stochastic depth (only kept samples computed);
* single tensor, training, 0 < rate <= 0.1: :class:`DropPath` masks on each branch;
* packed (list) batch, training, rate > 0: batch-subset stochastic depth per crop group;
* otherwise: plain residuals.

The official single-tensor path reuses ``drop_path1`` for both branches (flagged upstream as a known issue); here
each branch has its own parameter-free ``DropPath`` module, the same distribution.
"""

from __future__ import annotations

from torch import Tensor, nn

from components.models.layers.attention import Attention, AttnBackend
from components.models.layers.drop_path import DropPath, drop_add_residual_subset, drop_add_residual_subset_packed
from components.models.layers.ffn import FfnLayer, build_ffn
from components.models.layers.layer_scale import LayerScale
from components.models.layers.packing import PackedLayout

# Below this rate the subset form's gather/scatter costs more than it saves (official threshold).
SUBSET_DROP_MIN_RATE = 0.1


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        ffn_layer: FfnLayer = "mlp",
        attn_backend: AttnBackend = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, attn_backend=attn_backend)
        # Official semantics: None or 0 means no LayerScale (and no parameter in the state dict).
        self.ls1: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1: nn.Module = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = build_ffn(ffn_layer, dim, mlp_ratio, bias=ffn_bias)
        self.ls2: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2: nn.Module = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def attn_residual(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))  # (B, N, D)

    def ffn_residual(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))  # (..., D): token-wise, packed or not

    def attn_residual_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        return self.ls1(self.attn.forward_packed(self.norm1(x), layout))  # (T, D)

    def ffn_residual_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        return self.ffn_residual(x)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D)`` -> ``(B, N, D)``."""
        if self.training and self.sample_drop_ratio > SUBSET_DROP_MIN_RATE:
            x = drop_add_residual_subset(x, self.attn_residual, self.sample_drop_ratio)
            return drop_add_residual_subset(x, self.ffn_residual, self.sample_drop_ratio)
        x = x + self.drop_path1(self.attn_residual(x))  # drop_path modules are identities in eval
        return x + self.drop_path2(self.ffn_residual(x))

    def forward_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        """Packed ``(T, D)`` -> ``(T, D)``; attention stays within each sequence of ``layout``."""
        if self.training and self.sample_drop_ratio > 0.0:
            x = drop_add_residual_subset_packed(x, layout, self.attn_residual_packed, self.sample_drop_ratio)
            return drop_add_residual_subset_packed(x, layout, self.ffn_residual_packed, self.sample_drop_ratio)
        x = x + self.attn_residual_packed(x, layout)
        return x + self.ffn_residual(x)
