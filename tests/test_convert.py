"""Converters against the real libraries: Hugging Face ``Dinov2[WithRegisters]Model`` and timm's
``vit_*_patch14[_reg4]_dinov2``, built with random weights (tiny configs, no hub downloads), converted
both ways and compared on the final-norm CLS / register / patch tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from components.models import (
    BackboneConfig,
    DinoVisionTransformer,
    build_backbone,
    from_hf_dinov2,
    from_timm,
    strip_block_chunks,
    to_hf_dinov2,
    to_timm,
)

NATIVE = (56, 56)
RESIZED = (42, 70)  # 3 x 5 patch grid from the 4 x 4 reference grid: pos-embed interpolation


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Real values everywhere (LayerScale init and zero biases would hide mapping mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def images(h: int, w: int, batch: int = 2) -> Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))


def backbone_cfg(registers: int, swiglu: bool, offset: float = 0.0) -> BackboneConfig:
    # HF / timm interpolate with an explicit size: ours matches with offset 0 (antialias as each library).
    return BackboneConfig(arch="vit_pico", patch_size=14, img_size=56, drop_path_rate=0.0,
                          num_register_tokens=registers, ffn_layer="swiglufused" if swiglu else "mlp",
                          interpolate_offset=offset, interpolate_antialias=registers > 0)


def ours_tokens(model: DinoVisionTransformer, x: Tensor, masks: Tensor | None = None) -> Tensor:
    with torch.no_grad():
        out = model.forward_features(x, masks)
    parts = [out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]]
    return torch.cat([p for p in parts if p is not None], dim=1)  # (B, 1 + R + N, D)


def hf_tokens(model: nn.Module, x: Tensor, masks: Tensor | None = None) -> Tensor:
    with torch.no_grad():
        return model(pixel_values=x, bool_masked_pos=masks).last_hidden_state  # type: ignore[no-any-return]


def hf_model(config: dict[str, object]) -> nn.Module:
    registers = config.get("model_type") == "dinov2_with_registers"
    cls_config = Dinov2WithRegistersConfig if registers else Dinov2Config
    model_cls = Dinov2WithRegistersModel if registers else Dinov2Model
    return model_cls(cls_config.from_dict(config)).eval()  # type: ignore[attr-defined]


def random_masks(h: int, w: int) -> Tensor:
    return torch.rand(2, (h // 14) * (w // 14), generator=torch.Generator().manual_seed(7)) < 0.4


# ---------------------------------------------------------------------------------- Hugging Face


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (4, False), (0, True), (4, True)])
def test_ours_to_hf_and_back(registers: int, swiglu: bool) -> None:
    cfg = backbone_cfg(registers, swiglu)
    ours = randomize(build_backbone(cfg))
    assert isinstance(ours, DinoVisionTransformer)
    hf_sd, hf_config = to_hf_dinov2(ours.state_dict(), cfg)
    hf = hf_model(hf_config)
    hf.load_state_dict(hf_sd, strict=True)
    for h, w in (NATIVE, RESIZED):
        x, masks = images(h, w), random_masks(h, w)
        torch.testing.assert_close(hf_tokens(hf, x, masks), ours_tokens(ours, x, masks), atol=1e-5, rtol=1e-5)
    back = from_hf_dinov2(hf.state_dict())
    assert back.keys() == ours.state_dict().keys()
    for key, value in ours.state_dict().items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (4, True)])
def test_hf_model_to_ours(registers: int, swiglu: bool) -> None:
    common = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=2, image_size=56, patch_size=14,
                  use_swiglu_ffn=swiglu, layerscale_value=0.5)
    hf = randomize(Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
                   if registers else Dinov2Model(Dinov2Config(**common)))
    ours = build_backbone(backbone_cfg(registers, swiglu)).eval()
    ours.load_state_dict(from_hf_dinov2(hf.state_dict()), strict=True)
    for h, w in (NATIVE, RESIZED):
        x, masks = images(h, w), random_masks(h, w)
        torch.testing.assert_close(ours_tokens(ours, x, masks), hf_tokens(hf, x, masks), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("swiglu", [False, True])
def test_legacy_hub_layout_loads_through_transformers_from_pretrained(swiglu: bool, tmp_path: Path) -> None:
    """transformers renames the ``facebook/dinov2-*`` layout on load: a real check of the legacy names."""
    cfg = backbone_cfg(0, swiglu)
    ours = randomize(build_backbone(cfg))
    assert isinstance(ours, DinoVisionTransformer)
    legacy_sd, hf_config = to_hf_dinov2(ours.state_dict(), cfg, layout="legacy")
    assert "encoder.layer.0.attention.attention.query.weight" in legacy_sd
    assert ("encoder.layer.0.mlp.weights_in.weight" in legacy_sd) == swiglu
    save_file({k: v.contiguous() for k, v in legacy_sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(hf_config))
    hf = Dinov2Model.from_pretrained(tmp_path).eval()
    x = images(*RESIZED)
    torch.testing.assert_close(hf_tokens(hf, x), ours_tokens(ours, x), atol=1e-5, rtol=1e-5)
    back = from_hf_dinov2(legacy_sd)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_official_offset_differs_from_hf_off_native_size() -> None:
    """Documented mismatch: the official hub models interpolate with offset 0.1 (scale factor), HF with
    an explicit size. Identical at the native resolution, slightly different elsewhere."""
    cfg = backbone_cfg(0, False, offset=0.1)
    ours = randomize(build_backbone(cfg))
    assert isinstance(ours, DinoVisionTransformer)
    hf_sd, hf_config = to_hf_dinov2(ours.state_dict(), cfg)
    hf = hf_model(hf_config)
    hf.load_state_dict(hf_sd)
    x = images(*NATIVE)
    torch.testing.assert_close(hf_tokens(hf, x), ours_tokens(ours, x), atol=1e-5, rtol=1e-5)
    x = images(*RESIZED)
    assert float((hf_tokens(hf, x) - ours_tokens(ours, x)).abs().max()) > 1e-4


def test_hf_converter_rejects_what_it_cannot_map() -> None:
    cfg = backbone_cfg(0, False)
    ours = build_backbone(cfg)
    with pytest.raises(ValueError, match="identity"):
        to_hf_dinov2(ours.state_dict(), BackboneConfig(**{**cfg.__dict__, "ffn_layer": "identity"}))
    with pytest.raises(ValueError, match="blocks"):
        to_hf_dinov2({k: v for k, v in ours.state_dict().items() if not k.startswith("blocks.3.")}, cfg)
    hf_sd, _ = to_hf_dinov2(ours.state_dict(), cfg)
    with pytest.raises(ValueError, match="unrecognised"):
        from_hf_dinov2({**hf_sd, "pooler.dense.weight": torch.zeros(1)})
    prefixed = {f"dinov2.{k}": v for k, v in hf_sd.items()} | {"classifier.weight": torch.zeros(3, 128)}
    assert from_hf_dinov2(prefixed).keys() == ours.state_dict().keys()


# ------------------------------------------------------------------------------------------ timm


def timm_model(registers: int, swiglu: bool) -> nn.Module:
    name = ("vit_giant_patch14" if swiglu else "vit_small_patch14") + ("_reg4" if registers else "") + "_dinov2"
    # SwiGLUPacked's fc1 width is 2 x hidden: 2 x 176 for a 64-wide model (official rounding of 2/3 x 256).
    extra = {"mlp_ratio": 2 * 176 / 64} if swiglu else {}
    model = timm.create_model(name, pretrained=False, img_size=56, embed_dim=64, depth=4, num_heads=2,
                              num_classes=0, dynamic_img_size=True, **extra)
    return model.eval()


def timm_tokens(model: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.forward_features(x)  # type: ignore[operator,no-any-return]


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (4, False), (4, True)])
def test_ours_to_timm_and_back(registers: int, swiglu: bool) -> None:
    cfg = backbone_cfg(registers, swiglu)
    cfg.interpolate_antialias = True  # timm resamples with antialiasing, registers or not
    ours = randomize(build_backbone(cfg))
    assert isinstance(ours, DinoVisionTransformer)
    theirs = timm_model(registers, swiglu)
    theirs.load_state_dict(to_timm(ours.state_dict()), strict=True)
    for h, w in (NATIVE, RESIZED):
        x = images(h, w)
        torch.testing.assert_close(timm_tokens(theirs, x), ours_tokens(ours, x), atol=1e-5, rtol=1e-5)
    # timm's own filter for official checkpoints accepts ours unchanged: our names are the official ones.
    filtered = checkpoint_filter_fn(dict(ours.state_dict()), theirs)
    reference = to_timm(ours.state_dict())
    assert filtered.keys() == reference.keys()
    assert all(torch.equal(filtered[k], reference[k]) for k in reference)
    # Back to ours: CLS position folded into the CLS token for registers, but the same function.
    again = build_backbone(cfg).eval()
    again.load_state_dict(from_timm(theirs.state_dict(), swiglu=swiglu), strict=True)
    x = images(*RESIZED)
    torch.testing.assert_close(ours_tokens(again, x), ours_tokens(ours, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("registers", "swiglu"), [(0, False), (4, True)])
def test_timm_model_to_ours(registers: int, swiglu: bool) -> None:
    theirs = randomize(timm_model(registers, swiglu))
    cfg = backbone_cfg(registers, swiglu)
    cfg.interpolate_antialias = True
    ours = build_backbone(cfg).eval()
    converted = from_timm(theirs.state_dict(), swiglu=swiglu)
    assert float(converted["mask_token"].abs().max()) == 0.0
    ours.load_state_dict(converted, strict=True)
    for h, w in (NATIVE, RESIZED):
        x = images(h, w)
        torch.testing.assert_close(ours_tokens(ours, x), timm_tokens(theirs, x), atol=1e-5, rtol=1e-5)


def test_strip_block_chunks() -> None:
    chunked = {
        "blocks.0.0.norm1.weight": torch.zeros(1),
        "blocks.1.3.attn.qkv.bias": torch.zeros(1),
        "backbone.blocks.0.2.ls1.gamma": torch.zeros(1),
        "blocks.2.norm1.weight": torch.zeros(1),  # already flat: untouched
        "pos_embed": torch.zeros(1),
    }
    assert list(strip_block_chunks(chunked)) == [
        "blocks.0.norm1.weight", "blocks.3.attn.qkv.bias", "backbone.blocks.2.ls1.gamma", "blocks.2.norm1.weight",
        "pos_embed"]
