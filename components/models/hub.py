"""One loader for every place a backbone lives: ``components.models.load(uri) -> BackboneBundle``.

- ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``: a registry version (plain backbone folder or
  pyfunc model), downloaded once into ``<state>/cache/models`` through the current MLflow registry;
- a folder: a backbone folder (``config.json`` + ``model.safetensors``), or any folder holding one,
  such as a pulled or saved pyfunc model;
- ``hub:dinov2_vits14`` (and the other released names): the official weights through ``torch.hub``,
  built with the official hub settings (518 px grid, LayerScale, registers and their interpolation).
  Needs network access on first use.
"""

from __future__ import annotations

from pathlib import Path

import torch

from components.models.builders import BackboneConfig, build_backbone
from components.models.export import IMAGENET_MEAN, IMAGENET_STD, BackboneBundle, load_backbone
from components.models.pretrained import RELEASED, load_pretrained_backbone

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


def load(uri: str | Path, device: str | torch.device = "cpu", cache_dir: Path | None = None) -> BackboneBundle:
    """The backbone ``uri`` names (see the module docstring), in eval mode on ``device``."""
    text = str(uri)
    if text.startswith("models:/"):
        from components.environment import state_dir
        from components.registry.resolve import resolve_model_uri

        resolved = resolve_model_uri(text, cache_dir or state_dir() / "cache" / "models")
        bundle = load_backbone(resolved.backbone_dir, device=device)
        bundle.metadata.setdefault("registry", {"name": resolved.name, "version": resolved.version,
                                                "run_id": resolved.run_id, "source": resolved.source})
        return bundle
    if text.startswith("hub:"):
        config = released_config(text.removeprefix("hub:"))
        model = build_backbone(config)
        load_pretrained_backbone(model, text)
        return BackboneBundle(model=model.to(device).eval(), config=config, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              metadata={"source": text})
    folder = Path(text)
    if not folder.is_dir():
        raise FileNotFoundError(f"{text}: not a models:/ URI, a hub: name or a folder")
    from components.registry.resolve import find_backbone_dir

    return load_backbone(find_backbone_dir(folder), device=device)
