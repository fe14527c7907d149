"""Backbone files without pickle: ``model.safetensors`` + ``config.json``.

``config.json`` holds what a user needs to rebuild and feed the model: the backbone config (arch,
patch size, registers, image size, ...), the input normalisation, the embedding width, and free-form
provenance (run id, step). Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from components.models.builders import (
    BackboneConfig,
    backbone_config_from_dict,
    backbone_config_to_dict,
    build_backbone,
)
from components.models.vit import DinoVisionTransformer

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "dinoflow-backbone/1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneBundle:
    model: DinoVisionTransformer
    config: BackboneConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metadata: dict[str, Any] = field(default_factory=dict)


def save_backbone(
    model: torch.nn.Module,
    config: BackboneConfig,
    directory: Path,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write the backbone's weights and config into ``directory`` atomically (a folder rename)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
    try:
        # safetensors refuses shared storage; contiguous copies make every tensor its own buffer.
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": FORMAT})
        payload = {
            "format": FORMAT,
            "backbone": backbone_config_to_dict(config),
            "embed_dim": int(getattr(model, "embed_dim", 0)),
            "normalization": {"mean": list(mean), "std": list(std)},
            "metadata": dict(metadata or {}),
        }
        (staging / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def load_backbone(directory: Path, device: str | torch.device = "cpu") -> BackboneBundle:
    """Rebuild the backbone from ``config.json`` and load ``model.safetensors`` strictly."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file() or not (directory / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{directory}: not a backbone folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    payload = json.loads(config_path.read_text())
    if payload.get("format") != FORMAT:
        raise ValueError(f"{config_path}: unknown format {payload.get('format')!r}, expected {FORMAT!r}")
    config = backbone_config_from_dict(payload["backbone"])
    model = build_backbone(config)
    model.load_state_dict(load_file(str(directory / WEIGHTS_FILE), device=str(device)), strict=True)
    model.to(device).eval()
    norm = payload.get("normalization", {})
    return BackboneBundle(model=model, config=config, mean=tuple(norm.get("mean", IMAGENET_MEAN)),
                          std=tuple(norm.get("std", IMAGENET_STD)), metadata=payload.get("metadata", {}))


def is_backbone_dir(folder: Path) -> bool:
    """A folder written by :func:`save_backbone` (its config.json says so)."""
    config = Path(folder) / CONFIG_FILE
    if not config.is_file() or not (Path(folder) / WEIGHTS_FILE).is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("format") == FORMAT)
    except (json.JSONDecodeError, AttributeError):
        return False


def find_backbone_dir(folder: Path) -> Path:
    """``folder`` itself if it is a backbone folder, else the shallowest backbone folder below it
    (a pyfunc model keeps its backbone under ``artifacts/``)."""
    folder = Path(folder)
    if is_backbone_dir(folder):
        return folder
    candidates = sorted((p.parent for p in folder.rglob(CONFIG_FILE) if is_backbone_dir(p.parent)),
                        key=lambda p: (len(p.relative_to(folder).parts), str(p)))
    if not candidates:
        raise FileNotFoundError(f"{folder}: holds no dinoflow backbone ({CONFIG_FILE} + {WEIGHTS_FILE})")
    return candidates[0]
