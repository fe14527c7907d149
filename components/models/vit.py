"""The DINOv2 Vision Transformer backbone (arXiv 2304.07193, Sec. 4-5), compatible with the official
``DinoVisionTransformer``: same parameter names and shapes (an official hub ``state_dict`` loads with
``strict=True`` and ours loads into theirs), same token layout ``[CLS, registers..., patches...]``,
same position-embedding interpolation, same outputs of ``forward_features`` and
``get_intermediate_layers``.

Differences from the official code:

* No ``block_chunks`` (FSDP wrapping units): blocks are always ``blocks.<i>``, the layout of the
  official hub checkpoints. Training checkpoints saved with chunks (``blocks.<chunk>.<i>``) load after
  :func:`components.models.convert.strip_block_chunks`.
* The list (multi-crop) forward packs all crops into one token batch and restricts attention per
  sequence with xformers' block-diagonal mask when available on CUDA, or with one batched SDPA call per
  run of equal-length sequences otherwise (the official code requires xformers for lists).
* No dropout layers (the official backbone builds them with rate 0) and no custom ``embed_layer``,
  ``act_layer`` or ``block_fn`` hooks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.models.layers.attention import AttnBackend
from components.models.layers.block import Block
from components.models.layers.ffn import FfnLayer
from components.models.layers.packing import PackedLayout
from components.models.layers.patch_embed import PatchEmbed

FeatureDict = dict[str, Tensor | None]
IntermediateLayers = tuple[Tensor, ...] | tuple[tuple[Tensor, Tensor], ...]


def drop_path_rates(drop_path_rate: float, depth: int, uniform: bool) -> list[float]:
    """Per-block stochastic-depth rates: constant, or linear from 0 to ``drop_path_rate``.

    The linear schedule goes through float32 ``torch.linspace`` exactly as the official code, because
    the rounded values decide which stochastic-depth form a block uses (threshold 0.1).
    """
    if uniform:
        return [drop_path_rate] * depth
    rates: list[float] = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also under meta
    return rates


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        ffn_layer: FfnLayer = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: AttnBackend = "auto",
    ) -> None:
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1  # the CLS token: the only prefix token with a position embedding
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self.chunked_blocks = False

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_tokens, embed_dim))
        self.register_tokens: nn.Parameter | None = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=rate,
                init_values=init_values,
                ffn_layer=ffn_layer,
                attn_backend=attn_backend,
            )
            for rate in drop_path_rates(drop_path_rate, depth, drop_path_uniform)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head: nn.Module = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: pos_embed trunc-normal(.02), CLS/registers normal(1e-6), Linear timm-style."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------- tokens

    def interpolate_pos_encoding(self, x: Tensor, h: int, w: int) -> Tensor:
        """Position embedding ``(1, 1 + h/p * w/p, D)`` for an ``h`` x ``w`` image (bicubic on the grid).

        With ``interpolate_offset > 0`` the official trick is kept: interpolate with scale factor
        ``(new + offset) / old`` (the scale, not the output size, sets the sampling positions), for
        bit-compatibility with the released checkpoints; with 0 an explicit output size is used.
        ``x`` only supplies the output dtype, as in the official signature.
        """
        grid_h, grid_w = self.patch_embed.patches_resolution
        new_h, new_w = h // self.patch_size, w // self.patch_size
        if (new_h, new_w) == (grid_h, grid_w):
            return self.pos_embed
        pos_embed = self.pos_embed.float()  # bicubic in low precision visibly shifts the embedding
        dim = pos_embed.shape[-1]
        patch_pos = pos_embed[:, 1:].reshape(1, grid_h, grid_w, dim).permute(0, 3, 1, 2)  # (1, D, gh, gw)
        antialias = self.interpolate_antialias
        if self.interpolate_offset:
            scale = ((new_h + self.interpolate_offset) / grid_h, (new_w + self.interpolate_offset) / grid_w)
            patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic", antialias=antialias)
        else:
            patch_pos = F.interpolate(patch_pos, size=(new_h, new_w), mode="bicubic", antialias=antialias)
        if tuple(patch_pos.shape[-2:]) != (new_h, new_w):
            raise RuntimeError(f"pos grid interpolated to {tuple(patch_pos.shape[-2:])}, expected {(new_h, new_w)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim)  # (1, N', D)
        return torch.cat((pos_embed[:, :1], patch_pos), dim=1).to(x.dtype)  # (1, 1 + N', D)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Images ``(B, C, H, W)`` -> tokens ``(B, 1 + R + N, D)`` = ``[CLS + pos, registers, patches + pos]``.

        ``masks`` ``(B, N)`` bool replaces the masked patch embeddings by ``mask_token`` before the
        position embedding is added (iBOT masked-image modeling, DINOv2 Sec. 4). Registers get no
        position embedding.
        """
        batch, _, h, w = x.shape
        tokens = self.patch_embed(x)  # (B, N, D)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat((self.cls_token.expand(batch, -1, -1), tokens), dim=1)  # (B, 1 + N, D)
        tokens = tokens + self.interpolate_pos_encoding(tokens, h, w)
        if self.register_tokens is not None:
            registers = self.register_tokens.expand(batch, -1, -1)  # (B, R, D)
            tokens = torch.cat((tokens[:, :1], registers, tokens[:, 1:]), dim=1)  # (B, 1 + R + N, D)
        return tokens

    def _features(self, x_prenorm: Tensor, x_norm: Tensor, masks: Tensor | None) -> FeatureDict:
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],  # (B, D)
            "x_norm_regtokens": x_norm[:, 1:first_patch],  # (B, R, D)
            "x_norm_patchtokens": x_norm[:, first_patch:],  # (B, N, D)
            "x_prenorm": x_prenorm,  # (B, 1 + R + N, D)
            "masks": masks,
        }

    # ---------------------------------------------------------------------------------- forward

    @overload
    def forward_features(self, x: Tensor, masks: Tensor | None = None) -> FeatureDict: ...

    @overload
    def forward_features(
        self, x: list[Tensor], masks: Sequence[Tensor | None] | None = None
    ) -> list[FeatureDict]: ...

    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> FeatureDict | list[FeatureDict]:
        """Features of one batch, or of a list of crop batches (then through the packed path)."""
        if isinstance(x, list):
            if isinstance(masks, Tensor):
                raise TypeError("a list of crop batches needs a list of masks (or None)")
            return self.forward_features_list(x, list(masks) if masks is not None else [None] * len(x))
        if masks is not None and not isinstance(masks, Tensor):
            raise TypeError("a single batch takes a single (B, N) mask tensor")
        tokens = self.prepare_tokens_with_masks(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self._features(tokens, self.norm(tokens), masks)

    def forward_features_list(self, xs: Sequence[Tensor], masks_list: Sequence[Tensor | None]) -> list[FeatureDict]:
        """Features of several crop batches (e.g. global and local crops) in one packed pass.

        Every token-wise operation runs once on the concatenation of all tokens; attention stays
        within each image's sequence. Results equal the per-batch :meth:`forward_features`.
        """
        if len(xs) != len(masks_list):
            raise ValueError(f"{len(xs)} crop batches but {len(masks_list)} masks")
        groups = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks_list, strict=True)]
        layout = PackedLayout.of(groups)
        tokens = layout.pack(groups)  # (T, D)
        for block in self.blocks:
            tokens = cast(Block, block).forward_packed(tokens, layout)
        prenorm, normed = layout.unpack(tokens), layout.unpack(self.norm(tokens))
        return [self._features(p, n, m) for p, n, m in zip(prenorm, normed, masks_list, strict=True)]

    def forward(self, *args: Any, is_training: bool = False, **kwargs: Any) -> Any:
        """Feature dict(s) when ``is_training``; else ``head(CLS)`` (the head is the identity)."""
        features = self.forward_features(*args, **kwargs)
        if is_training:
            return features
        if isinstance(features, list):
            raise TypeError("a list of crop batches is only supported with is_training=True")
        return self.head(features["x_norm_clstoken"])

    # ------------------------------------------------------------------------- intermediate layers

    def _blocks_to_take(self, n: int | Sequence[int]) -> list[int]:
        depth = len(self.blocks)
        indices = list(range(depth - n, depth)) if isinstance(n, int) else list(n)
        if not indices or len(set(indices)) != len(indices) or min(indices) < 0 or max(indices) >= depth:
            raise ValueError(f"blocks to take must be distinct indices in [0, {depth}), got {n!r}")
        return sorted(indices)  # outputs come in block order, as the official loop produces them

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> IntermediateLayers:
        """Patch tokens (and optionally CLS) after the last ``n`` blocks, or after the listed blocks.

        Patch tokens are ``(B, N, D)``, or ``(B, D, H/p, W/p)`` with ``reshape``; registers are left out.
        """
        wanted = self._blocks_to_take(n)
        tokens = self.prepare_tokens_with_masks(x)
        outputs: list[Tensor] = []
        for index, block in enumerate(self.blocks[: wanted[-1] + 1]):
            tokens = block(tokens)
            if index in wanted:
                outputs.append(tokens)  # (B, 1 + R + N, D)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]  # (B, D)
        patch_tokens = [out[:, 1 + self.num_register_tokens :] for out in outputs]  # (B, N, D)
        if reshape:
            batch, _, h, w = x.shape
            grid = (h // self.patch_size, w // self.patch_size)
            patch_tokens = [p.reshape(batch, *grid, -1).permute(0, 3, 1, 2).contiguous() for p in patch_tokens]
        if return_class_token:
            return tuple(zip(patch_tokens, class_tokens, strict=True))
        return tuple(patch_tokens)
