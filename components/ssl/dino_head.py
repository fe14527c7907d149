"""DINO projection head (DINO §3.1 "Network architecture"; DINOv2 §4 "Image-level objective").

``x -> MLP (in -> hidden -> hidden -> bottleneck, GELU) -> L2-normalise -> prototypes``: the prototype
layer ``last_layer`` is a bias-free ``Linear(bottleneck, K)`` with weight normalisation (one gain per
prototype, ``weight = g * v / ||v||``, g initialised to 1), so every score is a cosine similarity
scaled by its prototype's gain. The same head class serves the DINO CLS objective and, when the heads
are untied (DINOv2 §4 "Untying head weights between both objectives"), the iBOT patch objective.

As the official ``dinov2.layers.DINOHead``: MLP Linear weights trunc-normal(std 0.02), biases 0; the
prototype layer keeps PyTorch's default Linear initialisation for ``v`` (the official code applies
its initialiser before creating it); ``nlayers=1`` is a single Linear; the normalisation eps is
1e-6 in float16 and 1e-12 otherwise.

Weight normalisation uses ``torch.nn.utils.parametrizations.weight_norm`` (the older
``torch.nn.utils.weight_norm`` hook is deprecated). Its parameters are named
``last_layer.parametrizations.weight.original0/1``; official checkpoints name them
``last_layer.weight_g/_v``. A load-state-dict pre-hook renames the official keys, so official
checkpoints load directly (strictly); :func:`official_head_state_dict` exports the official names.

The gain ``g``: the official DINOv2 head leaves it trainable (it only fills it with 1), unlike DINO v1's
default ``norm_last_layer=True`` which freezes it. ``norm_last_layer`` chooses; default False = DINOv2.

Freezing the prototypes during the first epoch (DINO's training recipe; official ``freeze_last_layer_epochs``):
:func:`cancel_last_layer_gradients` drops the ``last_layer`` gradients (``grad = None``, as DINO v1's
``cancel_gradients_last_layer``), so the optimiser skips them entirely — no update and no weight decay,
the same as the official DINOv2 trainer's zero last-layer learning rate for AdamW (except that AdamW's
moment estimates and step count do not advance for the skipped parameters).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

# (official checkpoint key, key of the parametrised module), relative to the head.
OFFICIAL_LAST_LAYER_KEYS: tuple[tuple[str, str], ...] = (
    ("last_layer.weight_g", "last_layer.parametrizations.weight.original0"),
    ("last_layer.weight_v", "last_layer.parametrizations.weight.original1"),
)


def build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    """The head's MLP with the official module indices (``mlp.0``, ``mlp.2``, ... or a bare Linear)."""
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    width_in = in_dim
    for _ in range(nlayers - 1):
        layers.append(nn.Linear(width_in, hidden_dim, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.GELU())
        width_in = hidden_dim
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


def init_linear_trunc_normal(module: nn.Module) -> None:
    """Official head init: Linear weights trunc-normal(std=0.02), biases zero (other modules untouched)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def rename_official_keys(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: dict[str, Any],
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load-state-dict pre-hook: official ``last_layer.weight_g/_v`` -> parametrisation keys, in place.

    ``load_state_dict`` hands hooks its own copy of the dict, so the caller's dict is untouched.
    """
    for official, native in OFFICIAL_LAST_LAYER_KEYS:
        if prefix + official in state_dict:
            state_dict[prefix + native] = state_dict.pop(prefix + official)


class DINOHead(nn.Module):
    """MLP projection, L2 normalisation and weight-normalised prototypes. (..., in_dim) -> (..., out_dim)

    Args:
        in_dim: backbone feature width.
        out_dim: number of prototypes K (65536 for ViT-S/B/L, 131072 for ViT-g in DINOv2).
        hidden_dim: MLP hidden width (2048).
        bottleneck_dim: width before normalisation (256 in DINO; 256 DINO / 256 or 384 iBOT in DINOv2).
        nlayers: number of Linear layers in the MLP (3).
        use_bn: BatchNorm1d after each hidden Linear (off in DINOv2).
        mlp_bias: biases in the MLP's Linear layers.
        norm_last_layer: freeze the prototype gains at 1 (DINO v1); False keeps them trainable (DINOv2).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        use_bn: bool = False,
        mlp_bias: bool = True,
        norm_last_layer: bool = False,
    ) -> None:
        super().__init__()
        self.mlp = build_mlp(max(nlayers, 1), in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.mlp.apply(init_linear_trunc_normal)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = self.prototype_gain
        with torch.no_grad():
            gain.fill_(1.0)
        gain.requires_grad_(not norm_last_layer)
        self.register_load_state_dict_pre_hook(rename_official_keys)

    @property
    def prototype_gain(self) -> nn.Parameter:
        """The weight-norm gain g (out_dim, 1) — the official ``last_layer.weight_g``."""
        gain: nn.Parameter = self.last_layer.parametrizations.weight.original0
        return gain

    @property
    def prototype_direction(self) -> nn.Parameter:
        """The weight-norm direction v (out_dim, bottleneck_dim) — the official ``last_layer.weight_v``."""
        direction: nn.Parameter = self.last_layer.parametrizations.weight.original1
        return direction

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)  # (..., bottleneck)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12  # 1e-12 underflows in float16
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)  # (..., K) cosine scores times the prototype gains


def official_head_state_dict(head: DINOHead) -> dict[str, Tensor]:
    """``head.state_dict()`` with the official key names (``last_layer.weight_g/_v``), for official code."""
    renamed = dict(head.state_dict())
    for official, native in OFFICIAL_LAST_LAYER_KEYS:
        renamed[official] = renamed.pop(native)
    return renamed


def cancel_last_layer_gradients(head: nn.Module, current_epoch_or_iter: int, freeze_until: int) -> None:
    """Drop the prototype layer's gradients while ``current_epoch_or_iter < freeze_until``.

    Call after ``backward()`` and before ``optimizer.step()``; use epochs or iterations consistently
    for both arguments. ``head`` is any module with a ``last_layer`` (a :class:`DINOHead`).
    """
    if current_epoch_or_iter >= freeze_until:
        return
    last_layer = head.get_submodule("last_layer")
    for param in last_layer.parameters():
        param.grad = None
