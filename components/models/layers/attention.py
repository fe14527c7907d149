"""Multi-head self-attention with the official DINOv2 parameter names (``qkv``, ``proj``).

The kernel is chosen by ``attn_backend``:

* ``"sdpa"``: :func:`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient /
  math kernel picked by PyTorch for the device).
* ``"xformers"``: ``xformers.ops.memory_efficient_attention``, as the official ``MemEffAttention``;
  requires xformers and CUDA tensors, else raises.
* ``"auto"`` (default): xformers when it is installed and the input is on CUDA, SDPA otherwise.

Packed batches (:class:`~components.models.layers.packing.PackedLayout`) restrict attention to each
sequence: with xformers through a ``BlockDiagonalMask`` (the official path); otherwise one batched SDPA
call per run of adjacent equal-length sequences, which for DINOv2's crops is one call for the global
crops and one for the local crops.

Simplification vs. the official code: no attention / projection dropout (the official backbone
always builds them with rate 0).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from types import ModuleType
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from components.models.layers.packing import PackedLayout

AttnBackend = Literal["auto", "sdpa", "xformers"]


@functools.cache
def xformers_ops() -> ModuleType | None:
    """``xformers.ops`` when importable, else None (looked up once, on first use)."""
    if importlib.util.find_spec("xformers") is None:
        return None
    try:
        return importlib.import_module("xformers.ops")
    except ImportError:  # installed but broken (e.g. built for another torch): fall back to SDPA
        return None


def uses_xformers(backend: AttnBackend, x: Tensor) -> bool:
    """Whether ``backend`` resolves to xformers for a tensor on ``x.device``."""
    if backend == "sdpa":
        return False
    available = xformers_ops() is not None
    if backend == "xformers":
        if not available:
            raise RuntimeError("attn_backend='xformers' but xformers is not installed (pip install dinoflow[gpu])")
        if not x.is_cuda:
            raise RuntimeError("attn_backend='xformers' needs CUDA tensors; use 'auto' or 'sdpa' on CPU")
        return True
    if backend != "auto":
        raise ValueError(f"unknown attn_backend {backend!r}; expected 'auto', 'sdpa' or 'xformers'")
    return available and x.is_cuda


class Attention(nn.Module):
    """Self-attention: ``qkv`` projects to queries, keys and values; ``proj`` mixes the heads."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_backend: AttnBackend = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend: AttnBackend = attn_backend
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape  # (B, N, D)
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        out = self._xformers(qkv, attn_bias=None) if uses_xformers(self.attn_backend, x) else self._sdpa(qkv)
        return self.proj(out.reshape(batch, tokens, dim))

    def forward_packed(self, x: Tensor, layout: PackedLayout) -> Tensor:
        """Attention within each sequence of a packed ``(T, D)`` token batch."""
        total, dim = x.shape  # (T, D)
        qkv = self.qkv(x).view(total, 3, self.num_heads, self.head_dim)  # (T, 3, H, Dh)
        if uses_xformers(self.attn_backend, x):
            out = self._xformers(qkv.unsqueeze(0), attn_bias=self._block_diagonal_bias(layout)).view(total, dim)
        else:
            heads = (3, self.num_heads, self.head_dim)
            outs = [
                self._sdpa(qkv[run.start : run.stop].view(run.batch_size, run.seq_len, *heads))
                for run in layout.runs()
            ]  # each (B_run, N_run, H, Dh)
            out = torch.cat([o.reshape(-1, dim) for o in outs]) if len(outs) > 1 else outs[0].reshape(total, dim)
        return self.proj(out)  # (T, D)

    @staticmethod
    def _sdpa(qkv: Tensor) -> Tensor:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, H, N, Dh); default scale Dh**-0.5 as official
        return out.transpose(1, 2)  # (B, N, H, Dh)

    @staticmethod
    def _xformers(qkv: Tensor, attn_bias: object | None) -> Tensor:
        ops = xformers_ops()
        assert ops is not None  # uses_xformers() checked availability
        q, k, v = qkv.unbind(2)  # each (B, N, H, Dh): xformers' native layout, no transpose
        out: Tensor = ops.memory_efficient_attention(q, k, v, attn_bias=attn_bias)
        return out  # (B, N, H, Dh)

    @staticmethod
    def _block_diagonal_bias(layout: PackedLayout) -> object:
        if "xformers_bias" not in layout.cache:
            ops = xformers_ops()
            assert ops is not None
            layout.cache["xformers_bias"] = ops.fmha.BlockDiagonalMask.from_seqlens(layout.sequence_lengths())
        return layout.cache["xformers_bias"]
