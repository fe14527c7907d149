"""Export a dinoflow backbone folder as a Hugging Face ``Dinov2Model`` folder.

The result is what ``save_pretrained`` writes (``config.json`` + ``model.safetensors``) plus a
``preprocessor_config.json`` carrying the backbone's normalisation, so that
``transformers.Dinov2Model.from_pretrained(out_dir)`` (or ``Dinov2WithRegistersModel`` for register
models, or ``AutoModel``) and ``AutoImageProcessor.from_pretrained(out_dir)`` work offline.

HF resizes position embeddings without the official ``interpolate_offset``: outputs agree with ours at
the native resolution (``img_size``) always, and at other resolutions only for ``interpolate_offset=0``
(see docs/models.md, "Interpolation across libraries"). The export is verified by reloading the
written folder and comparing the CLS token at the native resolution.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from components.models.builders import BackboneConfig, backbone_config_from_dict
from components.models.convert import to_hf_dinov2
from components.models.export import CONFIG_FILE, FORMAT, WEIGHTS_FILE, load_backbone

PREPROCESSOR_FILE = "preprocessor_config.json"
BICUBIC = 3  # PIL's resampling code, as in the facebook/dinov2-* processors


@dataclass(frozen=True)
class HfExport:
    directory: Path
    model_class: str  # "Dinov2Model" or "Dinov2WithRegistersModel"
    max_abs_diff: float | None  # CLS token, HF vs ours at the native size (None: not verified)
    notes: list[str] = field(default_factory=list)


def read_backbone_files(backbone_dir: Path) -> tuple[dict[str, torch.Tensor], BackboneConfig, dict[str, Any]]:
    """The raw weights, the backbone config and the whole ``config.json`` payload of a backbone folder."""
    backbone_dir = Path(backbone_dir)
    payload = json.loads((backbone_dir / CONFIG_FILE).read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{backbone_dir}: not a dinoflow backbone folder (format {payload.get('format')!r})")
    state = dict(load_file(str(backbone_dir / WEIGHTS_FILE)))
    return state, backbone_config_from_dict(payload["backbone"]), payload


def image_processor_config(config: BackboneConfig, mean: list[float], std: list[float]) -> dict[str, object]:
    """A ``BitImageProcessor`` config like the released DINOv2 ones: resize, center crop, normalise."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": config.img_size},
        "resample": BICUBIC,
        "do_center_crop": True,
        "crop_size": {"height": config.img_size, "width": config.img_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(mean),
        "image_std": list(std),
    }


def export_hf(backbone_dir: Path, out_dir: Path, verify: bool = True) -> HfExport:
    """Write ``out_dir`` (replaced atomically) loadable with ``Dinov2Model.from_pretrained``."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    state, config, payload = read_backbone_files(backbone_dir)
    hf_state, hf_config = to_hf_dinov2(state, config)
    registers = config.num_register_tokens > 0
    config_cls: Any = Dinov2WithRegistersConfig if registers else Dinov2Config
    model_cls: Any = Dinov2WithRegistersModel if registers else Dinov2Model
    hf_model = model_cls(config_cls.from_dict(hf_config))
    hf_model.load_state_dict(hf_state, strict=True)
    norm = payload.get("normalization") or {}
    mean, std = list(norm.get("mean", [0.485, 0.456, 0.406])), list(norm.get("std", [0.229, 0.224, 0.225]))

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        hf_model.save_pretrained(str(staging), safe_serialization=True)
        (staging / PREPROCESSOR_FILE).write_text(
            json.dumps(image_processor_config(config, mean, std), indent=2, sort_keys=True) + "\n")
        diff = verify_hf_folder(staging, backbone_dir, config) if verify else None
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    notes = []
    if config.interpolate_offset != 0:
        notes.append(f"interpolate_offset={config.interpolate_offset}: HF matches ours at {config.img_size} px only")
    return HfExport(out_dir, model_cls.__name__, diff, notes)


def verify_hf_folder(folder: Path, backbone_dir: Path, config: BackboneConfig, tolerance: float = 1e-4) -> float:
    """Reload ``folder`` the way a user would and compare its CLS token with ours; raise past ``tolerance``."""
    from transformers import AutoModel

    theirs = AutoModel.from_pretrained(str(folder)).eval()
    ours = load_backbone(backbone_dir).model
    x = torch.randn(2, 3, config.img_size, config.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ours.forward_features(x)["x_norm_clstoken"]  # (B, D)
        exported = theirs(pixel_values=x).last_hidden_state[:, 0]  # (B, D)
    diff = float((reference - exported).abs().max())
    if diff > tolerance:
        raise RuntimeError(f"Hugging Face export differs from the backbone by {diff:.3g} (> {tolerance})")
    return diff
