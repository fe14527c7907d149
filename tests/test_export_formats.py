"""The exporters against the real consumers: ``transformers`` ``from_pretrained``, ``timm.create_model``
and onnxruntime, on tiny random backbones written by ``save_backbone``. The state-dict converters
themselves (both directions, interpolation) are covered by tests/test_convert.py; here it is the
files a user receives and the way a user loads them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import BitImageProcessor, Dinov2Model, Dinov2WithRegistersModel

from components.models import BackboneConfig, build_backbone, load
from components.models.export import save_backbone
from components.models.hf_export import export_hf
from components.models.hub import released_config
from components.models.onnx_export import export_onnx
from components.models.timm_export import export_timm, recipe_path
from components.models.vit import DinoVisionTransformer

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
# (registers, FFN, custom sizes): the custom case sets width/depth/heads/FFN ratio in the config, no named arch.
CASES: dict[str, tuple[int, str, dict[str, float]]] = {
    "plain": (0, "mlp", {}),
    "registers-swiglu": (2, "swiglufused", {}),
    "custom-sizes": (0, "mlp", {"embed_dim": 48, "depth": 3, "num_heads": 3, "mlp_ratio": 2.0}),
}


def randomize(model: nn.Module, seed: int) -> DinoVisionTransformer:
    """Real values everywhere: LayerScale at 1e-5 and zero biases would hide mapping mistakes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    assert isinstance(model, DinoVisionTransformer)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(CASES))
def backbone(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BackboneConfig]:
    registers, ffn, sizes = CASES[request.param]
    config = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, num_register_tokens=registers,
                            ffn_layer=ffn, **sizes)  # type: ignore[arg-type]
    model = randomize(build_backbone(config), seed=registers)
    folder = save_backbone(model, config, tmp_path_factory.mktemp("bb") / "backbone", mean=MEAN, std=STD)
    return folder, config


def our_tokens(folder: Path, x: Tensor) -> dict[str, Tensor]:
    model = load(folder).model
    with torch.no_grad():
        out = model.forward_features(x)
    return {k: v for k, v in out.items() if isinstance(v, Tensor)}


def pixels(batch: int, size: int = 28, seed: int = 1) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))  # (B, 3, H, W)


def test_hf_folder_loads_with_from_pretrained(backbone: tuple[Path, BackboneConfig], tmp_path: Path) -> None:
    folder, config = backbone
    result = export_hf(folder, tmp_path / "hf")
    assert result.max_abs_diff is not None and result.max_abs_diff <= 1e-4
    files = {p.name for p in result.directory.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
    model_cls = Dinov2WithRegistersModel if config.num_register_tokens else Dinov2Model
    assert result.model_class == model_cls.__name__
    hf = model_cls.from_pretrained(str(result.directory)).eval()  # offline: HF_HUB_OFFLINE=1
    x = pixels(3)
    with torch.no_grad():
        out = hf(pixel_values=x)
    ours = our_tokens(folder, x)
    torch.testing.assert_close(out.last_hidden_state[:, 0], ours["x_norm_clstoken"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.pooler_output, ours["x_norm_clstoken"], atol=1e-5, rtol=0)
    first_patch = 1 + config.num_register_tokens
    torch.testing.assert_close(out.last_hidden_state[:, first_patch:], ours["x_norm_patchtokens"], atol=1e-5, rtol=0)
    processor = BitImageProcessor.from_pretrained(str(result.directory))
    assert tuple(processor.image_mean) == MEAN and tuple(processor.image_std) == STD
    assert processor.crop_size == {"height": 28, "width": 28}


def test_timm_weights_load_with_create_model(backbone: tuple[Path, BackboneConfig], tmp_path: Path) -> None:
    folder, config = backbone
    result = export_timm(folder, tmp_path / "timm" / "backbone.safetensors")
    recipe = json.loads(recipe_path(result.weights_path).read_text())
    assert recipe == {"model_name": result.model_name, "kwargs": result.model_kwargs}
    # Exactly what a user does with the recipe: no dinoflow code involved.
    model = timm.create_model(recipe["model_name"], pretrained=False, **recipe["kwargs"]).eval()
    model.load_state_dict(load_file(str(result.weights_path)), strict=True)
    x = pixels(2)
    with torch.no_grad():
        theirs = model.forward_features(x)  # (B, 1 + R + N, D)
        pooled = model.forward_head(theirs, pre_logits=True)  # (B, D): timm's CLS pooling
    ours = our_tokens(folder, x)
    reference = [ours["x_norm_clstoken"][:, None]]
    if config.num_register_tokens:
        reference.append(ours["x_norm_regtokens"])
    reference.append(ours["x_norm_patchtokens"])
    torch.testing.assert_close(theirs, torch.cat(reference, dim=1), atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, ours["x_norm_clstoken"], atol=1e-5, rtol=0)
    # Same parameters, less the mask token and, for register models, the CLS position (folded into cls_token).
    ours_count = sum(v.numel() for k, v in load(folder).model.state_dict().items() if k != "mask_token")
    assert sum(p.numel() for p in model.parameters()) == ours_count - (64 if config.num_register_tokens else 0)


def test_timm_export_refuses_what_timm_cannot_build(tmp_path: Path) -> None:
    config = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, ffn_bias=False)
    folder = save_backbone(build_backbone(config), config, tmp_path / "bb")
    with pytest.raises(ValueError, match="ffn_bias"):
        export_timm(folder, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_onnx_matches_torch_with_dynamic_batch(backbone: tuple[Path, BackboneConfig], tmp_path: Path) -> None:
    folder, config = backbone
    result = export_onnx(folder, tmp_path / "backbone.onnx")
    assert result.max_abs_diff <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == ["backbone.onnx"]
    graph = onnx.load(str(result.path))
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["dinoflow.mean"]) == list(MEAN) and props["dinoflow.img_size"] == "28"
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == result.output_names
    for batch in (1, 4):  # neither is the traced batch of 2
        x = pixels(batch, seed=batch)
        outputs = dict(zip(result.output_names, session.run(None, {"pixel_values": x.numpy()}), strict=True))
        ours = our_tokens(folder, x)
        np.testing.assert_allclose(outputs["cls"], ours["x_norm_clstoken"].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(outputs["patch_tokens"], ours["x_norm_patchtokens"].numpy(), atol=1e-4, rtol=0)
        if config.num_register_tokens:
            np.testing.assert_allclose(outputs["register_tokens"], ours["x_norm_regtokens"].numpy(), atol=1e-4,
                                       rtol=0)
        assert outputs["cls"].shape == (batch, config.resolved_spec().embed_dim)


def test_load_finds_a_backbone_inside_a_folder(backbone: tuple[Path, BackboneConfig], tmp_path: Path) -> None:
    folder, config = backbone
    shutil.copytree(folder, tmp_path / "pulled" / "artifacts" / "whatever")  # a pyfunc model's layout
    bundle = load(tmp_path / "pulled")
    assert bundle.config == config and bundle.mean == MEAN
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no dinoflow backbone"):
        load(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="models:/"):
        load(tmp_path / "missing")


@pytest.mark.parametrize(("name", "arch", "registers", "ffn"), [
    ("dinov2_vits14", "vit_small", 0, "mlp"), ("dinov2_vitl14_reg", "vit_large", 4, "mlp"),
    ("dinov2_vitg14", "vit_giant2", 0, "swiglufused")])
def test_released_names_use_the_official_hub_settings(name: str, arch: str, registers: int, ffn: str) -> None:
    config = released_config(name)
    assert (config.arch, config.num_register_tokens, config.resolved_ffn_layer()) == (arch, registers, ffn)
    assert (config.patch_size, config.img_size, config.layerscale_init) == (14, 518, 1.0)
    # Official hub: register models interpolate with antialiasing and no offset; the others with offset 0.1.
    assert (config.interpolate_antialias, config.interpolate_offset) == ((True, 0.0) if registers else (False, 0.1))
    with pytest.raises(ValueError, match="unknown released model"):
        load("hub:dinov2_vitx14")
