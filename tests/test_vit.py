"""DinoVisionTransformer and its layers against independent references (float64 NumPy, closed forms)
and against the official DINOv2 parameter names / shapes written out by hand."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from components.models import (
    BackboneConfig,
    DinoVisionTransformer,
    backbone_config_from_dict,
    backbone_config_to_dict,
    build_backbone,
    drop_path_rates,
    vit_base,
    vit_giant2,
    vit_large,
    vit_pico,
    vit_small,
    vit_tiny,
)
from components.models.layers import (
    Attention,
    Block,
    DropPath,
    LayerScale,
    PatchEmbed,
    SwiGLUFFNFused,
    drop_add_residual_subset,
    swiglu_hidden_features,
)

# ------------------------------------------------------------------------------------ references


def np64(t: Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def layer_norm_ref(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def attention_ref(x: np.ndarray, attn: Attention) -> np.ndarray:
    """Softmax attention written out in float64: (B, N, D) -> (B, N, D)."""
    b, n, d = x.shape
    h = attn.num_heads
    qkv = x @ np64(attn.qkv.weight).T + np64(attn.qkv.bias)  # (B, N, 3D)
    q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, n, h, d // h).transpose(0, 2, 1, 3) for i in range(3))
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // h)  # (B, H, N, N)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, n, d)
    return out @ np64(attn.proj.weight).T + np64(attn.proj.bias)


def patch_embed_ref(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, p: int) -> np.ndarray:
    """Non-overlapping patches flattened (C, p, p) and projected: (B, C, H, W) -> (B, H/p * W/p, D)."""
    b, c, hh, ww = x.shape
    patches = x.reshape(b, c, hh // p, p, ww // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
    return patches @ weight.reshape(weight.shape[0], -1).T + bias


def cubic_weights(t: float, a: float = -0.75) -> list[float]:
    """Keys' cubic convolution kernel (a = -0.75, PyTorch's non-antialiased bicubic) at the 4 taps."""

    def near(d: float) -> float:
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: float) -> float:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def bicubic_matrix(n_in: int, n_out: int, src_per_dst: float) -> np.ndarray:
    """1-D bicubic resampling matrix, half-pixel centres, border taps clamped (align_corners=False)."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        src = src_per_dst * (i + 0.5) - 0.5
        base = int(np.floor(src))
        for tap, w in zip(range(-1, 3), cubic_weights(src - base), strict=True):
            m[i, min(max(base + tap, 0), n_in - 1)] += w
    return m


def interpolate_pos_ref(model: DinoVisionTransformer, new_h: int, new_w: int, offset: float) -> np.ndarray:
    pos = np64(model.pos_embed)[0]  # (1 + N, D)
    gh, gw = model.patch_embed.patches_resolution
    grid = pos[1:].reshape(gh, gw, -1)
    # The official offset trick passes a scale factor, and the kernel samples at 1 / scale_factor steps.
    sh, sw = (gh / (new_h + offset), gw / (new_w + offset)) if offset else (gh / new_h, gw / new_w)
    out = np.einsum("ih,hwd,jw->ijd", bicubic_matrix(gh, new_h, sh), grid, bicubic_matrix(gw, new_w, sw))
    return np.concatenate([pos[:1], out.reshape(new_h * new_w, -1)])


def pico(**kwargs: object) -> DinoVisionTransformer:
    defaults: dict[str, object] = {"patch_size": 14, "img_size": 56, "init_values": 1e-5}
    defaults.update(kwargs)
    return vit_pico(**defaults).eval().requires_grad_(False)  # type: ignore[arg-type]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial values everywhere (LayerScale 1e-5 and zero biases would hide mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


# ---------------------------------------------------------------------------------------- layers


def test_attention_matches_float64_softmax_reference() -> None:
    torch.manual_seed(0)
    attn = randomize(Attention(dim=32, num_heads=4, attn_backend="sdpa"))
    x = torch.randn(3, 7, 32)
    assert isinstance(attn, Attention)
    np.testing.assert_allclose(attn(x).detach().double().numpy(), attention_ref(np64(x), attn), atol=1e-5)
    attn.attn_backend = "auto"  # CPU: resolves to SDPA
    np.testing.assert_allclose(attn(x).detach().double().numpy(), attention_ref(np64(x), attn), atol=1e-5)


def test_xformers_backend_refuses_cpu_and_bad_names() -> None:
    attn = Attention(dim=8, num_heads=2, attn_backend="xformers")
    with pytest.raises(RuntimeError, match="xformers"):
        attn(torch.randn(1, 3, 8))
    attn.attn_backend = "flash"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="attn_backend"):
        attn(torch.randn(1, 3, 8))


def test_patch_embed_rectangular_matches_reference_and_rejects_ragged_sizes() -> None:
    torch.manual_seed(0)
    embed = PatchEmbed(img_size=28, patch_size=7, in_chans=3, embed_dim=16)
    x = torch.randn(2, 3, 21, 35)
    ref = patch_embed_ref(np64(x), np64(embed.proj.weight), np64(embed.proj.bias), 7)
    np.testing.assert_allclose(embed(x).detach().double().numpy(), ref, atol=1e-5)
    assert embed.num_patches == 16 and embed.patches_resolution == (4, 4)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        embed(torch.randn(1, 3, 22, 35))


def test_swiglu_hidden_width_follows_official_rounding_and_math() -> None:
    assert swiglu_hidden_features(1536 * 4) == 4096  # ViT-g
    assert swiglu_hidden_features(64 * 4) == 176  # int(170.67) = 170 -> next multiple of 8
    assert swiglu_hidden_features(384 * 4) == 1024
    torch.manual_seed(0)
    ffn = SwiGLUFFNFused(16, 64)
    assert ffn.w12.weight.shape == (2 * 48, 16) and ffn.w3.weight.shape == (16, 48)
    x = torch.randn(5, 16)
    w12, b12 = np64(ffn.w12.weight), np64(ffn.w12.bias)
    gate, value = np64(x) @ w12[:48].T + b12[:48], np64(x) @ w12[48:].T + b12[48:]
    ref = (gate / (1 + np.exp(-gate)) * value) @ np64(ffn.w3.weight).T + np64(ffn.w3.bias)
    np.testing.assert_allclose(ffn(x).detach().double().numpy(), ref, atol=1e-5)


def test_layer_scale_init_and_product() -> None:
    ls = LayerScale(6, init_values=1e-5)
    assert torch.equal(ls.gamma.detach(), torch.full((6,), 1e-5))
    with torch.no_grad():
        ls.gamma.copy_(torch.arange(6.0))
    x = torch.randn(2, 3, 6)
    torch.testing.assert_close(ls(x), x * torch.arange(6.0))


def test_drop_path_is_identity_in_eval_and_per_sample_in_training() -> None:
    x = torch.randn(200, 3, 4) + 5.0
    module = DropPath(0.25)
    assert torch.equal(module.eval()(x), x)
    torch.manual_seed(0)
    out = module.train()(x)
    kept = (out != 0).flatten(1).all(1)
    dropped = (out == 0).flatten(1).all(1)
    assert bool((kept | dropped).all())  # whole samples, never single tokens
    torch.testing.assert_close(out[kept], x[kept] / 0.75)
    assert 0.15 < float(dropped.float().mean()) < 0.35


def per_sample_residual(x: Tensor) -> Tensor:
    return torch.tanh(x) * 2 + 1  # depends on its own sample only, like a transformer branch


def test_subset_stochastic_depth_updates_exactly_the_kept_samples() -> None:
    torch.manual_seed(0)
    x = torch.randn(10, 4, 3)
    out = drop_add_residual_subset(x, per_sample_residual, drop_rate=0.3)
    changed = ~(out == x).flatten(1).all(1)
    assert int(changed.sum()) == 7  # max(int(10 * 0.7), 1)
    torch.testing.assert_close(out[changed], x[changed] + per_sample_residual(x[changed]) * 10 / 7)
    tiny = drop_add_residual_subset(x[:1], per_sample_residual, drop_rate=0.9)  # at least one sample kept
    torch.testing.assert_close(tiny, x[:1] + per_sample_residual(x[:1]))


def test_subset_stochastic_depth_is_unbiased() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 2, 3)
    draws = torch.stack([drop_add_residual_subset(x, per_sample_residual, 0.4) for _ in range(3000)])
    expected = x + per_sample_residual(x)  # each sample kept w.p. S/B and scaled by B/S
    torch.testing.assert_close(draws.mean(0), expected, atol=0.08, rtol=0)


def batch_sizes_seen_by_attention(block: Block, x: Tensor) -> list[int]:
    seen: list[int] = []
    handle = block.attn.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[0]))
    block(x)
    handle.remove()
    return seen


def test_block_picks_the_official_stochastic_depth_form() -> None:
    x = torch.randn(10, 5, 16)
    assert batch_sizes_seen_by_attention(Block(16, 2, drop_path=0.3).train(), x) == [7]  # subset form
    assert batch_sizes_seen_by_attention(Block(16, 2, drop_path=0.1).train(), x) == [10]  # DropPath form
    assert batch_sizes_seen_by_attention(Block(16, 2, drop_path=0.3).eval(), x) == [10]


def test_block_eval_matches_float64_reference() -> None:
    torch.manual_seed(0)
    block = randomize(Block(16, 2, init_values=1e-5, drop_path=0.3)).eval()
    assert isinstance(block, Block)
    x = torch.randn(2, 5, 16)
    xr = np64(x)
    h = xr + attention_ref(layer_norm_ref(xr, np64(block.norm1.weight), np64(block.norm1.bias)), block.attn) * np64(
        block.ls1.gamma
    )
    z = layer_norm_ref(h, np64(block.norm2.weight), np64(block.norm2.bias))
    mlp = block.mlp
    assert isinstance(mlp.fc1, nn.Linear) and isinstance(mlp.fc2, nn.Linear)
    hidden = z @ np64(mlp.fc1.weight).T + np64(mlp.fc1.bias)
    hidden = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / np.sqrt(2)))  # exact GELU
    ref = h + (hidden @ np64(mlp.fc2.weight).T + np64(mlp.fc2.bias)) * np64(block.ls2.gamma)
    np.testing.assert_allclose(block(x).detach().double().numpy(), ref, atol=1e-5)


def test_drop_path_schedule_is_official_float32_linspace() -> None:
    rates = drop_path_rates(0.1, 4, uniform=False)
    assert rates == [r.item() for r in torch.linspace(0, 0.1, 4)]  # the official expression, float32 values
    assert rates[1] == pytest.approx(0.1 / 3) and rates[1] != 0.1 / 3
    assert rates[0] == 0.0 and rates[-1] > 0.1  # float32(0.1): the last block takes the subset form
    assert drop_path_rates(0.3, 3, uniform=True) == [0.3, 0.3, 0.3]


# --------------------------------------------------------------------- official names and shapes


def official_block_shapes(dim: int, mlp_hidden: int, swiglu_hidden: int | None = None) -> dict[str, tuple[int, ...]]:
    """One block of the official hub checkpoints (block_chunks=0), written out by hand."""
    shapes: dict[str, tuple[int, ...]] = {
        "norm1.weight": (dim,),
        "norm1.bias": (dim,),
        "attn.qkv.weight": (3 * dim, dim),
        "attn.qkv.bias": (3 * dim,),
        "attn.proj.weight": (dim, dim),
        "attn.proj.bias": (dim,),
        "ls1.gamma": (dim,),
        "norm2.weight": (dim,),
        "norm2.bias": (dim,),
        "ls2.gamma": (dim,),
    }
    if swiglu_hidden is None:
        shapes |= {
            "mlp.fc1.weight": (mlp_hidden, dim),
            "mlp.fc1.bias": (mlp_hidden,),
            "mlp.fc2.weight": (dim, mlp_hidden),
            "mlp.fc2.bias": (dim,),
        }
    else:
        shapes |= {
            "mlp.w12.weight": (2 * swiglu_hidden, dim),
            "mlp.w12.bias": (2 * swiglu_hidden,),
            "mlp.w3.weight": (dim, swiglu_hidden),
            "mlp.w3.bias": (dim,),
        }
    return shapes


def official_shapes(dim: int, depth: int, num_patches: int, patch: int, block: dict[str, tuple[int, ...]],
                    registers: int = 0) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + num_patches, dim),
        "mask_token": (1, dim),
        "patch_embed.proj.weight": (dim, 3, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    if registers:
        shapes["register_tokens"] = (1, registers, dim)
    for i in range(depth):
        shapes |= {f"blocks.{i}.{name}": shape for name, shape in block.items()}
    return shapes


def shapes_of(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_vits14_state_dict_equals_official_keys_and_shapes() -> None:
    with torch.device("meta"):
        model = vit_small(patch_size=14, img_size=518, init_values=1e-5)
    expected = official_shapes(384, 12, 37 * 37, 14, official_block_shapes(384, 1536))
    assert expected["pos_embed"] == (1, 1370, 384)
    assert shapes_of(model) == expected


def test_vits14_reg4_state_dict_equals_official_keys_and_shapes() -> None:
    with torch.device("meta"):
        model = vit_small(patch_size=14, img_size=518, init_values=1e-5, num_register_tokens=4)
    expected = official_shapes(384, 12, 1369, 14, official_block_shapes(384, 1536), registers=4)
    assert shapes_of(model) == expected


def test_vitg14_state_dict_uses_official_swiglu_names() -> None:
    with torch.device("meta"):
        model = vit_giant2(patch_size=14, img_size=518, init_values=1e-5)
    expected = official_shapes(1536, 40, 1369, 14, official_block_shapes(1536, 6144, swiglu_hidden=4096))
    assert shapes_of(model) == expected
    # A depth-1 ViT-g-width model is cheap enough to run: the SwiGLU shapes compose.
    one_block = DinoVisionTransformer(patch_size=14, img_size=28, embed_dim=1536, depth=1, num_heads=24,
                                      init_values=1e-5, ffn_layer="swiglufused").eval()
    assert shapes_of(one_block)["blocks.0.mlp.w3.weight"] == (1536, 4096)
    with torch.no_grad():
        assert one_block(torch.randn(1, 3, 28, 28)).shape == (1, 1536)


@pytest.mark.parametrize(("builder", "dim", "depth", "heads"), [
    (vit_tiny, 192, 12, 3), (vit_base, 768, 12, 12), (vit_large, 1024, 24, 16)])
def test_builders_have_official_dimensions(builder: object, dim: int, depth: int, heads: int) -> None:
    with torch.device("meta"):
        model = builder()  # type: ignore[operator]
    assert (model.embed_dim, len(model.blocks), model.num_heads, model.patch_size) == (dim, depth, heads, 16)
    assert model.blocks[0].mlp.fc1.out_features == 4 * dim


def test_official_weight_init() -> None:
    torch.manual_seed(0)
    model = vit_small(patch_size=14, img_size=224, init_values=1e-5, num_register_tokens=4).requires_grad_(False)
    assert 0.018 < float(model.pos_embed.std()) < 0.022
    assert float(model.cls_token.abs().max()) < 1e-5 and float(model.cls_token.abs().max()) > 0
    assert model.register_tokens is not None and 0 < float(model.register_tokens.abs().max()) < 1e-5
    assert float(model.mask_token.abs().max()) == 0.0
    qkv = model.blocks[3].attn.qkv
    assert 0.019 < float(qkv.weight.std()) < 0.021 and float(qkv.bias.abs().max()) == 0.0
    assert torch.equal(model.blocks[0].ls1.gamma.detach(), torch.full((384,), 1e-5))
    assert isinstance(vit_pico(init_values=None).blocks[0].ls1, nn.Identity)


# ------------------------------------------------------------------------------------- tokens


def test_interpolation_is_identity_at_native_size() -> None:
    model = pico()
    assert model.interpolate_pos_encoding(torch.zeros(1, 17, 64), 56, 56) is model.pos_embed


@pytest.mark.parametrize("offset", [0.1, 0.0])
@pytest.mark.parametrize(("h", "w"), [(42, 84), (98, 28)])
def test_interpolation_matches_bicubic_reference(offset: float, h: int, w: int) -> None:
    torch.manual_seed(0)
    model = pico(interpolate_offset=offset)
    out = model.interpolate_pos_encoding(torch.zeros(1, 1, 64), h, w)
    assert out.shape == (1, 1 + (h // 14) * (w // 14), 64)
    np.testing.assert_allclose(np64(out)[0], interpolate_pos_ref(model, h // 14, w // 14, offset), atol=2e-5)


def test_interpolation_offset_changes_the_sampling_positions() -> None:
    torch.manual_seed(0)
    with_offset, without = pico(interpolate_offset=0.1), pico(interpolate_offset=0.0)
    without.load_state_dict(with_offset.state_dict())
    a = with_offset.interpolate_pos_encoding(torch.zeros(1, 1, 64), 42, 84)
    b = without.interpolate_pos_encoding(torch.zeros(1, 1, 64), 42, 84)
    assert float((a - b).detach().abs().max()) > 1e-4  # the official offset is not a no-op


def test_antialiased_interpolation_matches_timm() -> None:
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    model = pico(img_size=112, interpolate_offset=0.0, interpolate_antialias=True)  # 8x8 grid
    for h, w in [(42, 70), (224, 56)]:  # downsampling (antialias matters) and mixed
        ours = model.interpolate_pos_encoding(torch.zeros(1, 1, 64), h, w)
        ref = resample_abs_pos_embed(model.pos_embed.detach(), [h // 14, w // 14], old_size=[8, 8],
                                     num_prefix_tokens=1, antialias=True)
        torch.testing.assert_close(ours, ref)
    plain = pico(img_size=112, interpolate_offset=0.0, interpolate_antialias=False)
    plain.load_state_dict(model.state_dict())
    down = (model.interpolate_pos_encoding(torch.zeros(1, 1, 64), 42, 42)
            - plain.interpolate_pos_encoding(torch.zeros(1, 1, 64), 42, 42))
    assert float(down.abs().max()) > 1e-4


def test_masked_tokens_are_mask_token_plus_position_and_registers_have_no_position() -> None:
    torch.manual_seed(0)
    model = randomize(pico(num_register_tokens=3))
    assert isinstance(model, DinoVisionTransformer) and model.register_tokens is not None
    x = torch.randn(2, 3, 42, 70)  # 3 x 5 grid: interpolated, rectangular
    masks = torch.zeros(2, 15, dtype=torch.bool)
    masks[0, [0, 4, 7]] = True
    masks[1, 14] = True
    tokens = np64(model.prepare_tokens_with_masks(x, masks))  # (B, 1 + R + N, D)
    pos = np64(model.interpolate_pos_encoding(torch.zeros(1, 1, 64), 42, 70))[0]
    patches = patch_embed_ref(np64(x), np64(model.patch_embed.proj.weight), np64(model.patch_embed.proj.bias), 14)
    expected_patches = np.where(np64(masks)[..., None] > 0, np64(model.mask_token)[None], patches) + pos[None, 1:]
    np.testing.assert_allclose(tokens[:, 4:], expected_patches, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tokens[:, 0], np.broadcast_to(np64(model.cls_token)[0, 0] + pos[0], (2, 64)), atol=1e-6)
    np.testing.assert_array_equal(tokens[:, 1:4], np.broadcast_to(np64(model.register_tokens)[0], (2, 3, 64)))


def test_forward_features_layout_with_registers() -> None:
    model = pico(num_register_tokens=4)
    x = torch.randn(2, 3, 56, 42)
    with torch.no_grad():
        out = model.forward_features(x)
        normed = model.norm(out["x_prenorm"])
        head = model(x)
    assert out["x_prenorm"].shape == (2, 1 + 4 + 12, 64)
    torch.testing.assert_close(out["x_norm_clstoken"], normed[:, 0])
    torch.testing.assert_close(out["x_norm_regtokens"], normed[:, 1:5])
    torch.testing.assert_close(out["x_norm_patchtokens"], normed[:, 5:])
    assert out["masks"] is None
    torch.testing.assert_close(head, out["x_norm_clstoken"])
    assert isinstance(model(x, is_training=True), dict)


def test_get_intermediate_layers_matches_forward_and_reshapes() -> None:
    torch.manual_seed(0)
    model = pico(num_register_tokens=2)
    x = torch.randn(2, 3, 42, 56)  # 3 x 4 grid
    with torch.no_grad():
        final = model.forward_features(x)
        last_two = model.get_intermediate_layers(x, n=2, return_class_token=True)
        chosen = model.get_intermediate_layers(x, n=[2, 0], reshape=True)
        raw = model.get_intermediate_layers(x, n=1, norm=False)
    assert len(last_two) == 2
    patches, cls = last_two[-1]
    torch.testing.assert_close(patches, final["x_norm_patchtokens"])
    torch.testing.assert_close(cls, final["x_norm_clstoken"])
    assert [tuple(t.shape) for t in chosen] == [(2, 64, 3, 4)] * 2
    flat_block2 = model.get_intermediate_layers(x, n=[2])[0]
    torch.testing.assert_close(chosen[1], flat_block2.reshape(2, 3, 4, 64).permute(0, 3, 1, 2))
    torch.testing.assert_close(raw[0], final["x_prenorm"][:, 3:])
    with pytest.raises(ValueError, match="distinct indices"):
        model.get_intermediate_layers(x, n=[4])


# ------------------------------------------------------------------------------------- config


def test_backbone_config_round_trip_and_validation() -> None:
    cfg = BackboneConfig(arch="vit_pico", patch_size=14, img_size=56, num_register_tokens=4, layerscale_init=None)
    assert backbone_config_from_dict(backbone_config_to_dict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown backbone config keys"):
        backbone_config_from_dict({**backbone_config_to_dict(cfg), "block_chunks": 4})
    for bad in ({"arch": "vit_huge"}, {"img_size": 57}, {"ffn_layer": "moe"}, {"attn_backend": "flash"},
                {"drop_path_rate": 1.0}, {"num_register_tokens": -1}):
        with pytest.raises(ValueError):
            backbone_config_from_dict({**backbone_config_to_dict(cfg), **bad})


def test_build_backbone_follows_config() -> None:
    cfg = BackboneConfig(arch="vit_pico", patch_size=14, img_size=56, drop_path_rate=0.2, drop_path_uniform=True,
                         num_register_tokens=2, layerscale_init=None, ffn_layer="swiglufused", qkv_bias=False)
    model = build_backbone(cfg)
    assert model.num_register_tokens == 2 and model.pos_embed.shape == (1, 17, 64)
    assert [b.sample_drop_ratio for b in model.blocks] == [0.2] * 4
    assert isinstance(model.blocks[0].ls1, nn.Identity) and isinstance(model.blocks[0].mlp, SwiGLUFFNFused)
    assert model.blocks[0].attn.qkv.bias is None
    with torch.device("meta"):
        giant = build_backbone(dataclasses.replace(cfg, arch="vit_giant2", ffn_layer=None))
        large = build_backbone(dataclasses.replace(cfg, arch="vit_large", ffn_layer=None))
    assert isinstance(giant.blocks[0].mlp, SwiGLUFFNFused)  # the architecture's default FFN
    assert not isinstance(large.blocks[0].mlp, SwiGLUFFNFused)


def test_custom_sizes_in_the_config_replace_the_named_architecture() -> None:
    from components.config import from_mapping
    from components.models import BackboneConfig, build_backbone
    from components.models.builders import backbone_config_from_dict, backbone_config_to_dict

    config = from_mapping(BackboneConfig, {"arch": "vit_pico", "patch_size": 4, "img_size": 28, "embed_dim": 96,
                                           "depth": 3, "num_heads": 6, "mlp_ratio": 2.0})
    model = build_backbone(config)
    assert model.embed_dim == 96 and len(model.blocks) == 3 and model.num_heads == 6
    assert model.blocks[0].mlp.fc1.out_features == 192  # mlp_ratio 2
    assert config.is_custom() and not BackboneConfig(arch="vit_pico").is_custom()
    assert backbone_config_from_dict(backbone_config_to_dict(config)) == config  # round trip (export config.json)
    named = build_backbone(BackboneConfig(arch="vit_pico", patch_size=4, img_size=28))
    assert named.embed_dim == 64 and len(named.blocks) == 4  # unset sizes keep the named architecture's
    with pytest.raises(ValueError, match="multiple of num_heads"):
        BackboneConfig(arch="vit_pico", embed_dim=100, num_heads=3).validate()
