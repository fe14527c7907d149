"""AdamW parameter groups of the DINOv2 recipe (paper §4; official ``get_params_groups_with_decay``).

- Layer-wise lr decay: multiplier ``decay ** (L + 1 - layer_id)`` where the patch embedding, position
  embedding and the cls/register/mask tokens are layer 0, block i is layer i + 1, and the final norm
  and the heads are layer L + 1 (multiplier 1).
- The patch embedding's lr is further multiplied by ``patch_embed_lr_mult`` (0.2).
- No weight decay on biases, norms and LayerScale gammas (by name as the official code, and on any
  1-D parameter so that renamed norms are covered too).
- Prototype (``last_layer``) parameters are flagged so they follow the frozen-then-cosine lr.

Groups with equal (lr multiplier, wd multiplier, last-layer flag) are fused, as the official code
does, to keep the optimiser's per-group loop short.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_EMBEDDING_NAMES = ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")


def layer_id(name: str, num_layers: int) -> int:
    """0 for embeddings and tokens, i + 1 for ``blocks.i``, ``num_layers + 1`` for the rest."""
    if any(token in name for token in _EMBEDDING_NAMES):
        return 0
    marker = "blocks."
    if marker in name:
        index = name[name.index(marker) + len(marker):].split(".", 1)[0]
        return int(index) + 1
    return num_layers + 1


def has_no_weight_decay(name: str, param: torch.Tensor | None = None) -> bool:
    """The official rule by name (biases, norms, LayerScale gammas), plus any 1-D parameter so a
    norm or bias under an unusual name is still excluded."""
    by_name = name.endswith(".bias") or "norm" in name or "gamma" in name
    return by_name or (param is not None and param.ndim <= 1)


@dataclass(frozen=True)
class ParamGroupSpec:
    lr_multiplier: float
    wd_multiplier: float
    is_last_layer: bool
    is_backbone: bool = False  # frozen (lr 0) during a head warm-up of continued pretraining


def param_group_spec(
    name: str,
    num_layers: int,
    layerwise_decay: float,
    patch_embed_lr_mult: float,
    in_backbone: bool,
    param: torch.Tensor | None = None,
) -> ParamGroupSpec:
    lid = layer_id(name, num_layers) if in_backbone else num_layers + 1
    lr_multiplier = layerwise_decay ** (num_layers + 1 - lid)
    if "patch_embed" in name:
        lr_multiplier *= patch_embed_lr_mult
    return ParamGroupSpec(
        lr_multiplier=lr_multiplier,
        wd_multiplier=0.0 if has_no_weight_decay(name, param) else 1.0,
        is_last_layer="last_layer" in name,
        is_backbone=in_backbone,
    )


def build_param_groups(
    modules: dict[str, nn.Module],
    num_layers: int,
    layerwise_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    backbone_key: str = "backbone",
) -> list[dict[str, Any]]:
    """Fused AdamW groups over the trainable parameters of ``modules`` (``{"backbone": ..., "dino_head": ...}``).

    Each group carries ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer`` for
    :func:`apply_schedules`.
    """
    fused: dict[ParamGroupSpec, list[torch.nn.Parameter]] = {}
    for module_name, module in modules.items():
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            spec = param_group_spec(f"{module_name}.{name}", num_layers, layerwise_decay, patch_embed_lr_mult,
                                    in_backbone=module_name == backbone_key, param=param)
            fused.setdefault(spec, []).append(param)
    return [
        {"params": params, "lr_multiplier": spec.lr_multiplier, "wd_multiplier": spec.wd_multiplier,
         "is_last_layer": spec.is_last_layer, "is_backbone": spec.is_backbone, "lr": 0.0, "weight_decay": 0.0}
        for spec, params in fused.items()
    ]


def apply_schedules(param_groups: Iterable[dict[str, Any]], lr: float, wd: float, last_layer_lr: float,
                    backbone_frozen: bool = False) -> None:
    """Set each group's lr and weight decay for this iteration from the schedules' values.

    ``backbone_frozen`` gives the backbone groups lr 0 (AdamW's decoupled decay is scaled by the lr,
    so the weights do not move either), as the head warm-up of continued pretraining needs.
    """
    for group in param_groups:
        base = last_layer_lr if group["is_last_layer"] else lr
        if backbone_frozen and group.get("is_backbone", False):
            base = 0.0
        group["lr"] = base * group["lr_multiplier"]
        group["weight_decay"] = wd * group["wd_multiplier"]
