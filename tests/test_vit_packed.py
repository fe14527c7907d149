"""The packed multi-crop forward (``forward_features_list``) against the per-crop forward, and its
stochastic depth against the official list-variant semantics recomputed crop group by crop group."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from components.models import DinoVisionTransformer, FeatureDict, PackedLayout, vit_pico
from components.models.layers import Block

FEATURE_KEYS = ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm")


def randomized_pico(seed: int = 0, **kwargs: object) -> DinoVisionTransformer:
    """LayerScale 1e-5 would make every residual negligible: give all parameters real values."""
    settings: dict[str, object] = {"patch_size": 14, "img_size": 56, "init_values": 1e-5}
    settings.update(kwargs)
    model = vit_pico(**settings)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def crops(seed: int = 1) -> tuple[list[Tensor], list[Tensor | None]]:
    """Global crops with iBOT masks, then two local groups of equal length (one attention run) and a
    rectangular group."""
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(3, 3, 56, 56, generator=gen), torch.randn(4, 3, 28, 28, generator=gen),
          torch.randn(2, 3, 28, 28, generator=gen), torch.randn(2, 3, 28, 42, generator=gen)]
    masks = torch.rand(3, 16, generator=gen) < 0.4
    return xs, [masks, None, None, None]


def assert_features_close(actual: FeatureDict, expected: FeatureDict, atol: float = 1e-5) -> None:
    for key in FEATURE_KEYS:
        a, e = actual[key], expected[key]
        assert a is not None and e is not None
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-5)


def test_layout_runs_merge_adjacent_equal_lengths_and_round_trip() -> None:
    layout = PackedLayout(batch_sizes=(3, 4, 2, 2), seq_lens=(17, 5, 5, 7))
    assert [(r.start, r.batch_size, r.seq_len) for r in layout.runs()] == [(0, 3, 17), (51, 6, 5), (81, 2, 7)]
    assert layout.num_tokens == 95 and layout.sequence_lengths() == [17] * 3 + [5] * 6 + [7] * 2
    groups = [torch.randn(b, n, 8) for b, n in zip(layout.batch_sizes, layout.seq_lens, strict=True)]
    packed = layout.pack(groups)
    assert packed.shape == (95, 8)
    for original, view in zip(groups, layout.unpack(packed), strict=True):
        assert torch.equal(original, view)
    with pytest.raises(ValueError, match="do not match"):
        layout.pack(groups[:3])
    with pytest.raises(ValueError, match="tokens"):
        layout.unpack(packed[:-1])


@pytest.mark.parametrize(("ffn_layer", "registers"), [("mlp", 0), ("swiglufused", 4)])
def test_packed_forward_equals_per_crop_forward(ffn_layer: str, registers: int) -> None:
    model = randomized_pico(ffn_layer=ffn_layer, num_register_tokens=registers).eval()
    xs, masks = crops()
    with torch.no_grad():
        packed = model.forward_features_list(xs, masks)
        separate = [model.forward_features(x, m) for x, m in zip(xs, masks, strict=True)]
    assert len(packed) == 4
    for p, s, m in zip(packed, separate, masks, strict=True):
        assert_features_close(p, s)
        assert p["masks"] is m
    assert packed[0]["x_norm_regtokens"] is not None and packed[0]["x_norm_regtokens"].shape == (3, registers, 64)


def test_list_input_dispatches_to_the_packed_path() -> None:
    model = randomized_pico(num_register_tokens=2).eval()
    xs, masks = crops()
    with torch.no_grad():
        via_forward = model(xs, masks=masks, is_training=True)
        via_list = model.forward_features_list(xs, masks)
        no_masks = model.forward_features(xs[1:])
    for a, b in zip(via_forward, via_list, strict=True):
        assert_features_close(a, b, atol=0)
    assert len(no_masks) == 3
    with pytest.raises(TypeError):
        model(xs)  # a list only makes sense for training features


def test_packed_gradients_equal_per_crop_gradients() -> None:
    model = randomized_pico(num_register_tokens=1).eval()  # eval: no stochastic depth, same function
    xs, masks = crops()

    def grads(packed: bool) -> dict[str, Tensor]:
        model.zero_grad()
        outs = model.forward_features_list(xs, masks) if packed else [
            model.forward_features(x, m) for x, m in zip(xs, masks, strict=True)]
        loss = sum((o["x_norm_patchtokens"] ** 2).mean() + o["x_norm_clstoken"].sum() for o in outs)  # type: ignore[operator]
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    packed, separate = grads(True), grads(False)
    assert packed.keys() == separate.keys() and "mask_token" in packed
    for name in packed:
        torch.testing.assert_close(packed[name], separate[name], atol=1e-4, rtol=1e-4, msg=name)


def official_list_stochastic_depth(model: DinoVisionTransformer, xs: list[Tensor],
                                   masks: list[Tensor | None]) -> list[Tensor]:
    """The official ``drop_add_residual_stochastic_depth_list`` semantics, one crop group at a time with
    the ordinary (unpacked) attention: per block and branch, each group draws ``randperm(B)[:S]`` in
    group order, the kept samples get ``B / S`` times their residual."""
    groups = [model.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks, strict=True)]
    for module in model.blocks:
        assert isinstance(module, Block)
        block: Block = module
        rate = block.sample_drop_ratio
        for branch in (block.attn_residual, block.ffn_residual):
            if rate == 0.0:
                groups = [g + branch(g) for g in groups]
                continue
            kept = [torch.randperm(g.shape[0])[: max(int(g.shape[0] * (1 - rate)), 1)] for g in groups]
            updated = []
            for g, idx in zip(groups, kept, strict=True):
                g = g.clone()
                g[idx] = g[idx] + branch(g[idx]) * (g.shape[0] / len(idx))
                updated.append(g)
            groups = updated
    return groups


def test_packed_training_stochastic_depth_follows_official_list_semantics() -> None:
    # Linear schedule 0 .. 0.5 over 4 blocks: block 0 has rate 0 (plain residual), the others draw subsets.
    model = randomized_pico(num_register_tokens=2, drop_path_rate=0.5, ffn_layer="swiglufused").train()
    assert [round(b.sample_drop_ratio, 3) for b in model.blocks] == [0.0, 0.167, 0.333, 0.5]
    xs, masks = crops()
    with torch.no_grad():
        torch.manual_seed(123)
        packed = model.forward_features_list(xs, masks)
        torch.manual_seed(123)
        reference = official_list_stochastic_depth(model, xs, masks)
    for out, ref in zip(packed, reference, strict=True):
        assert out["x_prenorm"] is not None
        torch.testing.assert_close(out["x_prenorm"], ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.manual_seed(124)  # other draws: other samples dropped, so the outputs differ
        other = model.forward_features_list(xs, masks)
    assert not torch.allclose(other[1]["x_prenorm"], packed[1]["x_prenorm"])  # type: ignore[arg-type]


def test_packed_training_step_backpropagates() -> None:
    model = randomized_pico(drop_path_rate=0.3, drop_path_uniform=True).train()
    xs, masks = crops()
    outs = model.forward_features_list(xs[:2], masks[:2])
    loss = sum(o["x_norm_clstoken"].pow(2).sum() for o in outs)  # type: ignore[union-attr]
    loss.backward()  # type: ignore[union-attr]
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert isinstance(model.blocks[0], nn.Module)
