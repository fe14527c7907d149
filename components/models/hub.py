"""Backbones from sources that need no registry: ``components.models.load(source) -> BackboneBundle``.

The source is parsed by the one model-source parser (components/registry/uri.py); this module builds
what the local kinds name:

- a folder: a backbone folder (``config.json`` + ``model.safetensors``), or any folder holding one,
  such as a pulled or saved pyfunc model;
- ``hub:dinov2_vits14`` (and the other released names): the official weights through ``torch.hub``,
  built with the official hub settings (518 px grid, LayerScale, registers and their interpolation).
  Needs network access on first use;
- ``state_dict:<arch>:<patch>:<img_size>:<weights>``: that architecture with the weights of a local file
  or a released name;
- ``random:<arch>:<patch>:<img_size>``: seeded, untrained (floors and tests; LayerScale off).

Registry versions (``models:/...``) are the registry's: ``components.registry.load`` resolves them
and then comes here, so this package never talks to MLflow.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from components.models.builders import BackboneConfig, build_backbone
from components.models.export import IMAGENET_MEAN, IMAGENET_STD, BackboneBundle, find_backbone_dir, load_backbone
from components.models.pretrained import load_pretrained_backbone
from components.models.vit import DinoVisionTransformer
from components.registry.uri import RELEASED, ArchSpec, ModelSource, parse_source

HUB_ARCHS = {"s": "vit_small", "b": "vit_base", "l": "vit_large", "g": "vit_giant2"}


def released_config(name: str) -> BackboneConfig:
    """The official ``torch.hub`` settings of a released model (``dinov2/hub/backbones.py``)."""
    if name not in RELEASED:
        raise ValueError(f"unknown released model {name!r}; choose from {RELEASED}")
    size = name.removeprefix("dinov2_vit")[0]  # dinov2_vits14 -> "s"
    registers = name.endswith("_reg")
    return BackboneConfig(arch=HUB_ARCHS[size], patch_size=14, img_size=518, drop_path_rate=0.0,
                          layerscale_init=1.0, num_register_tokens=4 if registers else 0,
                          interpolate_antialias=registers, interpolate_offset=0.0 if registers else 0.1)


def stated_config(arch: ArchSpec, layerscale: bool = True) -> BackboneConfig:
    """The BackboneConfig a ``random:`` / ``state_dict:`` source states (no drop path: not for training)."""
    config = BackboneConfig(arch=arch.arch, patch_size=arch.patch_size, img_size=arch.img_size, drop_path_rate=0.0)
    return config if layerscale else dataclasses.replace(config, layerscale_init=None)


def seeded_backbone(config: BackboneConfig, seed: int) -> DinoVisionTransformer:
    """Untrained weights from ``seed`` without touching the caller's RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(config)


def load(source: str | Path | ModelSource, device: str | torch.device = "cpu", root: Path | None = None,
         seed: int = 0) -> BackboneBundle:
    """The backbone a local ``source`` names (module docstring), in eval mode on ``device``.

    ``root`` anchors relative paths (default: the working folder); ``seed`` makes a ``random:`` source."""
    parsed = source if isinstance(source, ModelSource) else parse_source(str(source))
    if parsed.kind == "registry":
        raise ValueError(f"{parsed.text}: a registry version; load it with components.registry.load "
                         "(which finds the project's MLflow registry)")
    if parsed.kind == "pixels":
        raise ValueError(f"{parsed.text}: the pixel copy descriptor is not a backbone")
    if parsed.kind == "path":
        folder = Path(parsed.text)
        folder = folder if folder.is_absolute() or root is None else Path(root) / folder
        if folder.is_file():
            raise ValueError(f"{parsed.text}: a weights file; name its architecture too: "
                             "state_dict:<arch>:<patch>:<img_size>:<file>")
        if not folder.is_dir():
            raise FileNotFoundError(f"{parsed.text}: not a models:/ URI, a hub:/state_dict:/random: source or a "
                                    "folder")
        return load_backbone(find_backbone_dir(folder), device=device)
    if parsed.kind == "hub":
        assert parsed.name is not None
        config = released_config(parsed.name)
        model = build_backbone(config)
        load_pretrained_backbone(model, parsed.text)
    elif parsed.kind == "state_dict":
        assert parsed.arch is not None and parsed.target is not None
        config = stated_config(parsed.arch)
        model = build_backbone(config)
        target = parsed.target
        if root is not None and target not in RELEASED and not target.startswith("hub:") \
                and not Path(target).is_absolute():
            target = str(Path(root) / target)
        load_pretrained_backbone(model, target)
    else:  # random
        assert parsed.arch is not None
        config = stated_config(parsed.arch, layerscale=False)
        model = seeded_backbone(config, seed)
    return BackboneBundle(model=model.to(device).eval(), config=config, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          metadata={"source": parsed.text})
