"""Load existing backbone weights into a :class:`DinoVisionTransformer` for continued pretraining,
distillation or evaluation.

Sources, by the form of ``source``:

- a dinoflow backbone folder (``config.json`` + ``model.safetensors``), or a ``.safetensors`` file;
- a ``.pth``/``.pt`` state_dict: an official hub file (``dinov2_vits14_pretrain.pth``), or an official
  *training* checkpoint (``{"model": {"teacher.backbone.blocks.0.0...": ...}}``, chunked blocks);
  read with ``torch.load(weights_only=True)``, never unpickling code;
- ``hub:dinov2_vits14`` (and the other released names): downloaded through ``torch.hub`` from the
  official URL. That needs network access; machines without it should pass a local file instead.

The position embedding is resized to the model's grid when the file was trained at another size
(released models carry a 37x37 grid for 518 px), bicubic on the patch grid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from components.models.convert import strip_block_chunks
from components.models.vit import DinoVisionTransformer
from components.registry.uri import HUB_PREFIX, RELEASED, parse_source

OFFICIAL_URL = "https://dl.fbaipublicfiles.com/dinov2/{base}/{full}_pretrain.pth"
_PREFIXES = ("teacher.backbone.", "student.backbone.", "backbone.", "module.")


def read_state_dict(source: str) -> dict[str, Tensor]:
    """The backbone tensors named by ``source`` (see the module docstring), with official key names.

    ``source`` is parsed by the one model-source parser (components/registry/uri.py): ``hub:NAME`` or a
    bare released name (``dinov2_vits14``) is the official download, anything else a local path."""
    name = source.removeprefix(HUB_PREFIX)
    if source.startswith(HUB_PREFIX) or name in RELEASED:
        parse_source(HUB_PREFIX + name)  # an unknown released name fails here, with the list of known ones
        raw = torch.hub.load_state_dict_from_url(official_url(name), map_location="cpu")
        return normalise_keys(raw)
    path = Path(parse_source(source).require("path").text)
    if path.is_dir():
        from safetensors.torch import load_file

        from components.models.export import WEIGHTS_FILE

        return dict(load_file(str(path / WEIGHTS_FILE)))
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights not found: {source}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    raw = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: expected a state_dict (a mapping of tensors), got {type(raw).__name__}")
    return normalise_keys(raw)


def official_url(name: str) -> str:
    """The release URL: register models live beside their base model as ``<base>_reg4_pretrain.pth``."""
    base = name.removesuffix("_reg")
    full = f"{base}_reg4" if name.endswith("_reg") else base
    return OFFICIAL_URL.format(base=base, full=full)


def normalise_keys(raw: Mapping[str, object]) -> dict[str, Tensor]:
    """Unwrap ``{"model": ...}`` / ``{"teacher": ...}`` and strip trainer prefixes and block chunks."""
    for wrapper in ("model", "teacher", "state_dict"):
        inner = raw.get(wrapper)
        if isinstance(inner, Mapping):
            raw = inner
            break
    prefixed = [p for p in _PREFIXES if any(str(k).startswith(p) for k in raw)]
    prefix = prefixed[0] if prefixed else ""
    tensors = {str(k)[len(prefix):]: v for k, v in raw.items()
               if isinstance(v, Tensor) and str(k).startswith(prefix)}
    return strip_block_chunks(tensors)


def resize_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """``(1, 1 + h*w, D)`` -> ``(1, 1 + grid_h*grid_w, D)``: bicubic on the square patch grid."""
    n_patches = pos_embed.shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"cannot resize a non-square position grid of {n_patches} patches")
    if (side, side) == grid:
        return pos_embed
    dim = pos_embed.shape[-1]
    patches = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, s, s)
    patches = F.interpolate(patches, size=grid, mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim)  # (1, N', D)
    return torch.cat((pos_embed[:, :1].float(), patches), dim=1).to(pos_embed.dtype)


def load_pretrained_backbone(model: DinoVisionTransformer, source: str) -> list[str]:
    """Load ``source`` into ``model`` strictly, resizing the position grid; returns notes on what was adapted."""
    state = read_state_dict(source)
    notes = []
    target = model.state_dict()
    if "pos_embed" in state and state["pos_embed"].shape != target["pos_embed"].shape:
        grid = model.patch_embed.patches_resolution
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], (int(grid[0]), int(grid[1])))
        notes.append(f"pos_embed resized to the {grid[0]}x{grid[1]} grid")
    if "mask_token" not in state and "mask_token" in target:
        state["mask_token"] = torch.zeros_like(target["mask_token"])
        notes.append("mask_token absent in the source: zeros")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{source}: does not match the configured backbone; missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    return notes
