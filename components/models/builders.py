"""Named ViT architectures and the typed backbone config that lives in the params YAML.

Official sizes (DINOv2, arXiv 2304.07193, and the official ``vision_transformer.py``; mlp_ratio 4 for all):
ViT-S/B/L use the GELU MLP, ViT-g ("giant2": 1536 wide, 24 heads of 64) the fused SwiGLU FFN.
``vit_tiny``, ``vit_pico`` and ``vit_femto`` are CPU presets for tests and smoke runs, not official models.

``BackboneConfig`` mirrors the official ``student`` config keys (``layerscale`` is ``layerscale_init``
here). Differences: ``ffn_layer=None`` means "the architecture's default" (SwiGLU for vit_giant2,
MLP otherwise) where the official YAML spells it out, and ``attn_backend`` is new.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, get_args

from components.models.layers.attention import AttnBackend
from components.models.layers.ffn import FfnLayer
from components.models.vit import DinoVisionTransformer


@dataclass(frozen=True)
class ArchSpec:
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    ffn_layer: FfnLayer = "mlp"


def architecture_specs() -> dict[str, ArchSpec]:
    """Every named architecture: width / depth / heads."""
    return {
        "vit_femto": ArchSpec(embed_dim=32, depth=4, num_heads=1),
        "vit_pico": ArchSpec(embed_dim=64, depth=4, num_heads=2),
        "vit_tiny": ArchSpec(embed_dim=192, depth=12, num_heads=3),
        "vit_small": ArchSpec(embed_dim=384, depth=12, num_heads=6),
        "vit_base": ArchSpec(embed_dim=768, depth=12, num_heads=12),
        "vit_large": ArchSpec(embed_dim=1024, depth=24, num_heads=16),
        "vit_giant2": ArchSpec(embed_dim=1536, depth=40, num_heads=24, ffn_layer="swiglufused"),
    }


def architecture_spec(arch: str) -> ArchSpec:
    specs = architecture_specs()
    if arch not in specs:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(specs)}")
    return specs[arch]


def build_vit(arch: str, patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """The named architecture; ``kwargs`` go to :class:`DinoVisionTransformer` (and may override ffn_layer)."""
    spec = architecture_spec(arch)
    kwargs.setdefault("ffn_layer", spec.ffn_layer)
    return DinoVisionTransformer(
        patch_size=patch_size,
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        **kwargs,
    )


def vit_femto(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """32 wide, 4 deep, 1 head: about a quarter of vit_pico, the CPU distillation student."""
    return build_vit("vit_femto", patch_size, **kwargs)


def vit_pico(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """64 wide, 4 deep, 2 heads: a few hundred thousand parameters, for tests."""
    return build_vit("vit_pico", patch_size, **kwargs)


def vit_tiny(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """192 wide, 12 deep, 3 heads (DeiT-Ti sizes): CPU smoke runs."""
    return build_vit("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    return build_vit("vit_small", patch_size, **kwargs)


def vit_base(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    return build_vit("vit_base", patch_size, **kwargs)


def vit_large(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    return build_vit("vit_large", patch_size, **kwargs)


def vit_giant2(patch_size: int = 16, **kwargs: Any) -> DinoVisionTransformer:
    """ViT-g: 1536 wide (24 heads of 64), 40 deep, fused SwiGLU FFN (hidden 4096)."""
    return build_vit("vit_giant2", patch_size, **kwargs)


@dataclass
class BackboneConfig:
    """Student/teacher backbone settings; defaults are the official ``ssl_default_config.yaml`` ones."""

    arch: str = "vit_large"
    patch_size: int = 16
    img_size: int = 224  # global crop size: the grid the position embedding is learned on
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    layerscale_init: float | None = 1e-5  # None (or 0): no LayerScale
    ffn_layer: FfnLayer | None = None  # None: the architecture's default
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    attn_backend: AttnBackend = "auto"
    # Custom sizes: each set value replaces the named architecture's (``arch`` then only names the starting
    # point), so a user can train e.g. a 128-wide, 6-deep ViT without adding a named architecture in code.
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None

    def validate(self) -> None:
        spec = self.resolved_spec()
        if min(spec.embed_dim, spec.depth, spec.num_heads) < 1 or spec.mlp_ratio <= 0:
            raise ValueError(f"embed_dim, depth, num_heads must be >= 1 and mlp_ratio > 0, got {spec}")
        if spec.embed_dim % spec.num_heads:
            raise ValueError(f"embed_dim {spec.embed_dim} must be a multiple of num_heads {spec.num_heads}")
        if self.ffn_layer is not None and self.ffn_layer not in get_args(FfnLayer):
            raise ValueError(f"ffn_layer {self.ffn_layer!r} is not one of {get_args(FfnLayer)}")
        if self.attn_backend not in get_args(AttnBackend):
            raise ValueError(f"attn_backend {self.attn_backend!r} is not one of {get_args(AttnBackend)}")
        if self.patch_size < 1 or self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} must be a positive multiple of patch_size {self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if self.num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {self.num_register_tokens}")
        if self.interpolate_offset < 0:
            raise ValueError(f"interpolate_offset must be >= 0, got {self.interpolate_offset}")

    def resolved_ffn_layer(self) -> FfnLayer:
        return self.ffn_layer if self.ffn_layer is not None else architecture_spec(self.arch).ffn_layer

    def resolved_spec(self) -> ArchSpec:
        """The named architecture with this config's custom sizes applied."""
        spec = architecture_spec(self.arch)
        overrides = {name: getattr(self, name) for name in ("embed_dim", "depth", "num_heads", "mlp_ratio")
                     if getattr(self, name) is not None}
        return dataclasses.replace(spec, **overrides, ffn_layer=self.resolved_ffn_layer())

    def is_custom(self) -> bool:
        return self.resolved_spec() != dataclasses.replace(architecture_spec(self.arch),
                                                           ffn_layer=self.resolved_ffn_layer())


def build_backbone(cfg: BackboneConfig) -> DinoVisionTransformer:
    """The backbone ``cfg`` describes (for an EMA teacher, pass ``dataclasses.replace(cfg, drop_path_rate=0)``;
    the official teacher is built without stochastic depth)."""
    cfg.validate()
    spec = cfg.resolved_spec()
    return DinoVisionTransformer(
        embed_dim=spec.embed_dim,
        depth=spec.depth,
        num_heads=spec.num_heads,
        mlp_ratio=spec.mlp_ratio,
        patch_size=cfg.patch_size,
        img_size=cfg.img_size,
        drop_path_rate=cfg.drop_path_rate,
        drop_path_uniform=cfg.drop_path_uniform,
        init_values=cfg.layerscale_init,
        ffn_layer=spec.ffn_layer,
        num_register_tokens=cfg.num_register_tokens,
        interpolate_antialias=cfg.interpolate_antialias,
        interpolate_offset=cfg.interpolate_offset,
        qkv_bias=cfg.qkv_bias,
        proj_bias=cfg.proj_bias,
        ffn_bias=cfg.ffn_bias,
        attn_backend=cfg.attn_backend,
    )


def backbone_config_to_dict(cfg: BackboneConfig) -> dict[str, Any]:
    """Plain dict (YAML / MLflow params friendly)."""
    return dataclasses.asdict(cfg)


def backbone_config_from_dict(values: Mapping[str, Any]) -> BackboneConfig:
    """Inverse of :func:`backbone_config_to_dict`; unknown keys and invalid values raise ``ValueError``."""
    known = {f.name for f in dataclasses.fields(BackboneConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown backbone config keys {unknown}; known keys: {sorted(known)}")
    cfg = BackboneConfig(**dict(values))
    cfg.validate()
    return cfg
