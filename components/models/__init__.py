"""DINOv2-compatible Vision Transformer backbones: the model, named architectures, config, converters.

See docs/models.md. Importing this package has no side effects (xformers is looked up on first use).
"""

from components.models.builders import (
    ArchSpec,
    BackboneConfig,
    architecture_spec,
    architecture_specs,
    backbone_config_from_dict,
    backbone_config_to_dict,
    build_backbone,
    build_vit,
    vit_base,
    vit_femto,
    vit_giant2,
    vit_large,
    vit_pico,
    vit_small,
    vit_tiny,
)
from components.models.convert import from_hf_dinov2, from_timm, strip_block_chunks, to_hf_dinov2, to_timm
from components.models.export import BackboneBundle
from components.models.hub import load
from components.models.layers import AttnBackend, FfnLayer, PackedLayout
from components.models.vit import DinoVisionTransformer, FeatureDict, drop_path_rates

__all__ = [
    "ArchSpec",
    "AttnBackend",
    "BackboneBundle",
    "BackboneConfig",
    "DinoVisionTransformer",
    "FeatureDict",
    "FfnLayer",
    "PackedLayout",
    "architecture_spec",
    "architecture_specs",
    "backbone_config_from_dict",
    "backbone_config_to_dict",
    "build_backbone",
    "build_vit",
    "drop_path_rates",
    "from_hf_dinov2",
    "from_timm",
    "load",
    "strip_block_chunks",
    "to_hf_dinov2",
    "to_timm",
    "vit_base",
    "vit_femto",
    "vit_giant2",
    "vit_large",
    "vit_pico",
    "vit_small",
    "vit_tiny",
]
