"""State-dict converters between the official DINOv2 layout (ours) and Hugging Face / timm.

All functions are pure: they take and return ``{name: tensor}`` dicts and never build models.

Hugging Face (``Dinov2Model`` / ``Dinov2WithRegistersModel``), two key layouts:

* ``"current"``: module names of transformers >= 5 (``attention.q_proj``/``k_proj``/``v_proj``,
  ``attention.o_proj``, SwiGLU ``mlp.gate_proj``/``up_proj``/``down_proj``); loads with
  ``load_state_dict(strict=True)`` into the installed models.
* ``"legacy"``: the layout of the ``facebook/dinov2-*`` hub checkpoints and transformers 4.x
  (``attention.attention.query``/``key``/``value``, ``attention.output.dense``, SwiGLU
  ``mlp.weights_in``/``weights_out``); transformers >= 5 renames it on ``from_pretrained``.

HF always has LayerScale (``layer_scale{1,2}.lambda1``) and biases on the attention output and the
FFN: a model without them is exported with ones / zeros (same function). HF interpolates position
embeddings with an explicit output size (no offset), antialiased only for the registers model, so it
matches ours for ``interpolate_offset=0`` (``interpolate_antialias`` = False without registers, True
with), not the official ``offset=0.1`` at resolutions other than the native one.

timm (``vit_*_patch14_dinov2``, ``vit_*_patch14_reg4_dinov2``): same names as the official code
except SwiGLU (``mlp.fc1``/``fc2`` for ``w12``/``w3``, timm's ``SwiGLUPacked``), no ``mask_token``
(dropped on export, zeros on import), and for register models ``no_embed_class=True``: ``pos_embed``
covers patches only and the CLS position is folded into ``cls_token`` (``register_tokens`` ->
``reg_token``), exactly as timm's own ``checkpoint_filter_fn``. Importing such a model gives a zero CLS
position and the folded CLS token: the same function. timm interpolates with an explicit size and
antialiasing, matching ours for ``interpolate_offset=0, interpolate_antialias=True``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from components.models.builders import BackboneConfig

HfLayout = Literal["current", "legacy"]
StateDict = dict[str, Tensor]

HF_TOP_LEVEL = {
    "cls_token": "embeddings.cls_token",
    "mask_token": "embeddings.mask_token",
    "pos_embed": "embeddings.position_embeddings",
    "register_tokens": "embeddings.register_tokens",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
HF_PREFIXES = ("dinov2.", "dinov2_with_registers.")
BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
HF_BLOCK_KEY = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
CHUNKED_BLOCK_KEY = re.compile(r"(^|\.)blocks\.\d+\.(\d+)\.")


def hf_block_renames(layout: HfLayout) -> dict[str, str]:
    """Our block-relative names -> HF's, for the parameters that map one to one."""
    renames = {
        "norm1.weight": "norm1.weight",
        "norm1.bias": "norm1.bias",
        "norm2.weight": "norm2.weight",
        "norm2.bias": "norm2.bias",
        "ls1.gamma": "layer_scale1.lambda1",
        "ls2.gamma": "layer_scale2.lambda1",
        "mlp.fc1.weight": "mlp.fc1.weight",
        "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight",
        "mlp.fc2.bias": "mlp.fc2.bias",
    }
    out_proj, ffn_out = ("attention.o_proj", "mlp.down_proj") if layout == "current" else (
        "attention.output.dense", "mlp.weights_out")
    for kind in ("weight", "bias"):
        renames[f"attn.proj.{kind}"] = f"{out_proj}.{kind}"
        renames[f"mlp.w3.{kind}"] = f"{ffn_out}.{kind}"
        if layout == "legacy":
            renames[f"mlp.w12.{kind}"] = f"mlp.weights_in.{kind}"
    return renames


def hf_qkv_names(layout: HfLayout) -> tuple[str, str, str]:
    if layout == "current":
        return ("attention.q_proj", "attention.k_proj", "attention.v_proj")
    return ("attention.attention.query", "attention.attention.key", "attention.attention.value")


def num_blocks(state_dict: Mapping[str, Tensor], pattern: re.Pattern[str] = BLOCK_KEY) -> int:
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


def strip_block_chunks(state_dict: Mapping[str, Tensor]) -> StateDict:
    """``blocks.<chunk>.<i>.*`` (official training checkpoints with ``block_chunks > 0``) -> ``blocks.<i>.*``."""
    return {CHUNKED_BLOCK_KEY.sub(r"\1blocks.\2.", k): v for k, v in state_dict.items()}


# ------------------------------------------------------------------------------------ Hugging Face


def _block_to_hf(state_dict: Mapping[str, Tensor], block: int, layout: HfLayout) -> StateDict:
    ours, hf = f"blocks.{block}.", f"encoder.layer.{block}."
    out: StateDict = {}
    for name, hf_name in hf_block_renames(layout).items():
        if ours + name in state_dict:
            out[hf + hf_name] = state_dict[ours + name]
    for kind in ("weight", "bias"):
        if ours + f"attn.qkv.{kind}" in state_dict:
            for hf_name, part in zip(hf_qkv_names(layout), state_dict[ours + f"attn.qkv.{kind}"].chunk(3), strict=True):
                out[hf + f"{hf_name}.{kind}"] = part  # qkv rows are [q; k; v]
        if layout == "current" and ours + f"mlp.w12.{kind}" in state_dict:
            gate, up = state_dict[ours + f"mlp.w12.{kind}"].chunk(2)  # the first half is the gate
            out[hf + f"mlp.gate_proj.{kind}"], out[hf + f"mlp.up_proj.{kind}"] = gate, up
    return out


def _fill_hf_required(out: StateDict, block: int, layout: HfLayout, dim: int, swiglu: bool) -> None:
    """HF always has LayerScale and output / FFN biases: add the neutral values where ours has none."""
    hf = f"encoder.layer.{block}."
    out.setdefault(hf + "layer_scale1.lambda1", torch.ones(dim))
    out.setdefault(hf + "layer_scale2.lambda1", torch.ones(dim))
    out_proj = "attention.o_proj" if layout == "current" else "attention.output.dense"
    out.setdefault(hf + f"{out_proj}.bias", torch.zeros(dim))
    if swiglu:
        names = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if layout == "current" else (
            "mlp.weights_in", "mlp.weights_out")
    else:
        names = ("mlp.fc1", "mlp.fc2")
    for name in names:
        weight = out[hf + f"{name}.weight"]
        out.setdefault(hf + f"{name}.bias", torch.zeros(weight.shape[0], dtype=weight.dtype))


def hf_config_dict(state_dict: Mapping[str, Tensor], config: BackboneConfig) -> dict[str, Any]:
    """``config.json`` content for ``Dinov2Config`` / ``Dinov2WithRegistersConfig``."""
    spec = config.resolved_spec()
    registers = config.num_register_tokens > 0
    values: dict[str, Any] = {
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "hidden_size": spec.embed_dim,
        "num_hidden_layers": spec.depth,
        "num_attention_heads": spec.num_heads,
        "mlp_ratio": int(spec.mlp_ratio) if float(spec.mlp_ratio).is_integer() else spec.mlp_ratio,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-6,
        "image_size": config.img_size,
        "patch_size": config.patch_size,
        "num_channels": int(state_dict["patch_embed.proj.weight"].shape[1]),
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
        "layerscale_value": config.layerscale_init or 1.0,
        "use_swiglu_ffn": config.resolved_ffn_layer() in ("swiglufused", "swiglu"),
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
    }
    if registers:
        values["num_register_tokens"] = config.num_register_tokens
    return values


def to_hf_dinov2(
    state_dict: Mapping[str, Tensor], config: BackboneConfig, layout: HfLayout = "current"
) -> tuple[StateDict, dict[str, Any]]:
    """Our (official-layout) backbone weights -> HF ``Dinov2[WithRegisters]Model`` weights and config dict."""
    spec = config.resolved_spec()
    ffn = config.resolved_ffn_layer()
    if ffn == "identity":
        raise ValueError("Hugging Face Dinov2 has no FFN-less blocks; ffn_layer='identity' cannot be exported")
    depth = num_blocks(state_dict)
    if depth != spec.depth:
        raise ValueError(f"state_dict has {depth} blocks but {config.arch} has {spec.depth}")
    grid = config.img_size // config.patch_size
    if state_dict["pos_embed"].shape[1] != 1 + grid * grid:
        raise ValueError(f"pos_embed {tuple(state_dict['pos_embed'].shape)} does not fit img_size {config.img_size}")
    out: StateDict = {HF_TOP_LEVEL[k]: v for k, v in state_dict.items() if k in HF_TOP_LEVEL}
    for block in range(depth):
        out.update(_block_to_hf(state_dict, block, layout))
        _fill_hf_required(out, block, layout, spec.embed_dim, swiglu=ffn != "mlp")
    return out, hf_config_dict(state_dict, config)


def _strip_hf_prefix(hf_state_dict: Mapping[str, Tensor]) -> StateDict:
    """Drop the base-model prefix of ``*ForImageClassification`` checkpoints, and their classifier."""
    out: StateDict = {}
    for key, value in hf_state_dict.items():
        if key.startswith("classifier."):
            continue
        for prefix in HF_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        out[key] = value
    return out


def _block_from_hf(hf: Mapping[str, Tensor], block: int) -> tuple[StateDict, set[str]]:
    """One HF layer (either layout) -> our block keys, and the HF keys it consumed."""
    src, ours = f"encoder.layer.{block}.", f"blocks.{block}."
    out: StateDict = {}
    used: set[str] = set()
    for layout in ("current", "legacy"):
        for name, hf_name in hf_block_renames(layout).items():
            if src + hf_name in hf:
                out[ours + name] = hf[src + hf_name]
                used.add(src + hf_name)
        for kind in ("weight", "bias"):
            parts = [src + f"{n}.{kind}" for n in hf_qkv_names(layout)]
            if all(p in hf for p in parts):
                out[ours + f"attn.qkv.{kind}"] = torch.cat([hf[p] for p in parts])
                used.update(parts)
    for kind in ("weight", "bias"):
        gate_up = [src + f"mlp.gate_proj.{kind}", src + f"mlp.up_proj.{kind}"]
        if all(p in hf for p in gate_up):
            out[ours + f"mlp.w12.{kind}"] = torch.cat([hf[p] for p in gate_up])
            used.update(gate_up)
    return out, used


def from_hf_dinov2(hf_state_dict: Mapping[str, Tensor]) -> StateDict:
    """HF ``Dinov2[WithRegisters]Model`` weights (either key layout) -> our official-layout weights."""
    hf = _strip_hf_prefix(hf_state_dict)
    inverse_top = {v: k for k, v in HF_TOP_LEVEL.items()}
    out: StateDict = {inverse_top[k]: v for k, v in hf.items() if k in inverse_top}
    used = {k for k in hf if k in inverse_top}
    for block in range(num_blocks(hf, HF_BLOCK_KEY)):
        block_sd, block_used = _block_from_hf(hf, block)
        out.update(block_sd)
        used |= block_used
    leftover = sorted(set(hf) - used)
    if leftover:
        raise ValueError(f"unrecognised Hugging Face keys: {leftover[:8]}{' ...' if len(leftover) > 8 else ''}")
    if "mask_token" not in out:  # use_mask_token=False models: the official layout always has one
        out["mask_token"] = torch.zeros(1, out["cls_token"].shape[-1], dtype=out["cls_token"].dtype)
    return out


# -------------------------------------------------------------------------------------------- timm


def to_timm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Our weights -> timm ``vit_*_patch14[_reg4]_dinov2`` weights (same conversion as timm's own filter)."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key in ("mask_token", "register_tokens", "cls_token", "pos_embed"):
            continue
        out[re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", key))] = value
    pos_embed = state_dict["pos_embed"]  # (1, 1 + N, D)
    if "register_tokens" in state_dict:
        # timm's no_embed_class layout: the CLS position moves into the CLS token itself.
        out["reg_token"] = state_dict["register_tokens"]
        out["cls_token"] = state_dict["cls_token"] + pos_embed[:, :1]
        out["pos_embed"] = pos_embed[:, 1:]
    else:
        out["cls_token"], out["pos_embed"] = state_dict["cls_token"], pos_embed
    return out


def from_timm(timm_state_dict: Mapping[str, Tensor], swiglu: bool = False) -> StateDict:
    """timm ``vit_*_patch14[_reg4]_dinov2`` weights -> ours. ``swiglu``: the model uses ``SwiGLUPacked``
    (giant), whose ``mlp.fc1``/``fc2`` become ``w12``/``w3``. A classifier ``head`` is dropped."""
    out: StateDict = {}
    for key, value in timm_state_dict.items():
        if key.startswith("head.") or key in ("reg_token", "pos_embed"):
            continue
        if swiglu:
            key = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", key))
        out[key] = value
    pos_embed = timm_state_dict["pos_embed"]
    if "reg_token" in timm_state_dict:
        # Patches-only pos_embed: the CLS token already carries its position, so its slot is zero.
        out["register_tokens"] = timm_state_dict["reg_token"]
        pos_embed = torch.cat((torch.zeros_like(pos_embed[:, :1]), pos_embed), dim=1)
    out["pos_embed"] = pos_embed
    cls_token = timm_state_dict["cls_token"]
    out["mask_token"] = torch.zeros(1, cls_token.shape[-1], dtype=cls_token.dtype)
    return out
