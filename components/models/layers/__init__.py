"""Building blocks of the DINOv2 Vision Transformer, one per module, with the official parameter names."""

from components.models.layers.attention import Attention, AttnBackend, uses_xformers, xformers_ops
from components.models.layers.block import Block
from components.models.layers.drop_path import (
    DropPath,
    drop_add_residual_subset,
    drop_add_residual_subset_packed,
    drop_path,
    random_batch_subset,
)
from components.models.layers.ffn import FfnLayer, build_ffn
from components.models.layers.layer_scale import LayerScale
from components.models.layers.mlp import Mlp
from components.models.layers.packing import PackedLayout, SequenceRun
from components.models.layers.patch_embed import PatchEmbed
from components.models.layers.swiglu import SwiGLUFFNFused, swiglu_hidden_features

__all__ = [
    "Attention",
    "AttnBackend",
    "Block",
    "DropPath",
    "FfnLayer",
    "LayerScale",
    "Mlp",
    "PackedLayout",
    "PatchEmbed",
    "SequenceRun",
    "SwiGLUFFNFused",
    "build_ffn",
    "drop_add_residual_subset",
    "drop_add_residual_subset_packed",
    "drop_path",
    "random_batch_subset",
    "swiglu_hidden_features",
    "uses_xformers",
    "xformers_ops",
]
