"""Export a dinoflow backbone folder as timm weights: a safetensors ``state_dict`` plus how to build it.

timm's DINOv2 family (``vit_{small,base,large,giant}_patch14[_reg4]_dinov2``) is the target. The model
name picks the family; the keyword arguments spell out every size, so non-standard architectures
(``vit_pico``, other register counts, patch sizes) build too::

    model = timm.create_model(name, pretrained=False, **kwargs)
    model.load_state_dict(safetensors.torch.load_file(path), strict=True)

Both the name and the kwargs are stored in the safetensors metadata (``timm_model``, ``timm_kwargs``)
and in a JSON file beside the weights (``<stem>.timm.json``). timm's ``dynamic_img_size=True``
resizes position embeddings with an explicit size and antialiasing: it agrees with ours at the native
resolution always, elsewhere for ``interpolate_offset=0, interpolate_antialias=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components.models.builders import BackboneConfig
from components.models.convert import to_timm
from components.models.hf_export import read_backbone_files
from components.storage.atomic import replace_atomically

MLP_FAMILIES = {"vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large"}


@dataclass(frozen=True)
class TimmExport:
    weights_path: Path
    model_name: str
    model_kwargs: dict[str, Any]
    max_abs_diff: float | None  # forward_features, timm vs ours at the native size (None: not verified)


def timm_model_name(config: BackboneConfig) -> str:
    # The family fixes what kwargs cannot say in JSON (the FFN class); sizes always come from kwargs.
    swiglu = config.resolved_ffn_layer() != "mlp"
    family = "vit_giant" if swiglu else MLP_FAMILIES.get(config.arch, "vit_small")
    registers = "_reg4" if config.num_register_tokens > 0 else ""
    return f"{family}_patch14{registers}_dinov2"


def timm_model_kwargs(state: dict[str, torch.Tensor], config: BackboneConfig) -> dict[str, Any]:
    """Every size of the backbone as ``timm.create_model`` keyword arguments (JSON-serialisable)."""
    spec = config.resolved_spec()
    swiglu = config.resolved_ffn_layer() != "mlp"
    fc1 = state["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"]  # (hidden, D)
    hidden = int(fc1.shape[0])
    mlp_ratio = hidden / spec.embed_dim
    if int(spec.embed_dim * mlp_ratio) != hidden:
        # timm computes the hidden width as int(dim * mlp_ratio): half a unit above the exact ratio
        # keeps that int() from landing one below through float rounding.
        mlp_ratio = (hidden + 0.5) / spec.embed_dim
    kwargs: dict[str, Any] = {
        "img_size": config.img_size,
        "patch_size": config.patch_size,
        "embed_dim": spec.embed_dim,
        "depth": spec.depth,
        "num_heads": spec.num_heads,
        "mlp_ratio": mlp_ratio,
        "qkv_bias": config.qkv_bias,
        "init_values": config.layerscale_init or None,
        "num_classes": 0,
        "dynamic_img_size": True,
    }
    if config.num_register_tokens > 0:
        kwargs["reg_tokens"] = config.num_register_tokens
    if not config.proj_bias:
        kwargs["proj_bias"] = False
    return kwargs


def export_timm(backbone_dir: Path, out_path: Path, verify: bool = True) -> TimmExport:
    """Write the timm weights to ``out_path`` (``.safetensors``) and the build recipe beside them."""
    state, config, _ = read_backbone_files(backbone_dir)
    if config.resolved_ffn_layer() == "identity" or not config.ffn_bias:
        raise ValueError("timm's ViT has no FFN-less or bias-free FFN blocks: ffn_layer='identity' and "
                         "ffn_bias=False cannot be exported")
    timm_state = {k: v.contiguous() for k, v in to_timm(state).items()}
    name, kwargs = timm_model_name(config), timm_model_kwargs(state, config)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "timm_model": name, "timm_kwargs": json.dumps(kwargs, sort_keys=True)}
    replace_atomically(out_path, lambda tmp: save_file(timm_state, str(tmp), metadata=metadata))
    recipe = json.dumps({"model_name": name, "kwargs": kwargs}, indent=2, sort_keys=True) + "\n"
    replace_atomically(recipe_path(out_path), lambda tmp: tmp.write_text(recipe))
    diff = verify_timm_export(out_path, backbone_dir, config) if verify else None
    return TimmExport(out_path, name, kwargs, diff)


def recipe_path(weights_path: Path) -> Path:
    return weights_path.with_name(weights_path.name.removesuffix(".safetensors") + ".timm.json")


def load_timm_export(weights_path: Path) -> torch.nn.Module:
    """Build and load an exported timm model from the metadata inside the safetensors file."""
    from safetensors import safe_open

    with safe_open(str(weights_path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "timm_model" not in metadata:
        raise ValueError(f"{weights_path}: no timm_model in the safetensors metadata; not a dinoflow timm export")
    import timm

    model = timm.create_model(metadata["timm_model"], pretrained=False, **json.loads(metadata["timm_kwargs"]))
    model.load_state_dict(load_file(str(weights_path)), strict=True)
    return model.eval()


def verify_timm_export(weights_path: Path, backbone_dir: Path, config: BackboneConfig,
                       tolerance: float = 1e-4) -> float:
    """timm's ``forward_features`` vs ours (CLS, registers, patches after the norm) at the native size."""
    from components.models.export import load_backbone

    theirs = load_timm_export(weights_path)
    ours = load_backbone(backbone_dir).model
    x = torch.randn(2, 3, config.img_size, config.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = ours.forward_features(x)
        parts = [out["x_norm_clstoken"], out["x_norm_regtokens"], out["x_norm_patchtokens"]]
        parts[0] = parts[0][:, None] if parts[0] is not None else None  # (B, 1, D)
        reference = torch.cat([p for p in parts if p is not None], dim=1)  # (B, 1 + R + N, D)
        exported = theirs.forward_features(x)  # type: ignore[operator]  # (B, 1 + R + N, D)
    diff = float((reference - exported).abs().max())
    if diff > tolerance:
        raise RuntimeError(f"timm export differs from the backbone by {diff:.3g} (> {tolerance})")
    return diff
