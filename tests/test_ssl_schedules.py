"""Schedules, parameter groups and the EMA update against closed forms written here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from components.ssl.ema import update_teacher
from components.ssl.param_groups import apply_schedules, build_param_groups, layer_id
from components.ssl.schedules import CosineSchedule, build_schedules, scaled_lr


def reference_schedule(base: float, final: float, total: int, warmup: int, start: float, freeze: int) -> np.ndarray:
    """The official construction: zeros, np.linspace warm-up, then a cosine over the rest (float64)."""
    parts = [np.zeros(freeze), np.linspace(start, base, warmup)]
    iters = np.arange(total - warmup - freeze)
    parts.append(final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters))))
    return np.concatenate(parts)


@pytest.mark.parametrize(("warmup", "freeze"), [(0, 0), (10, 0), (10, 5), (1, 3)])
def test_cosine_schedule_matches_reference(warmup: int, freeze: int) -> None:
    schedule = CosineSchedule(0.5, 1e-3, 100, warmup_iters=warmup, start_warmup_value=0.01, freeze_iters=freeze)
    expected = reference_schedule(0.5, 1e-3, 100, warmup, 0.01, freeze)
    got = np.array([schedule(i) for i in range(100)])
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)
    assert schedule(100) == schedule(10_000) == 1e-3


def test_schedule_rejects_impossible_lengths() -> None:
    with pytest.raises(ValueError, match="exceed the schedule length"):
        CosineSchedule(1.0, 0.0, 10, warmup_iters=8, freeze_iters=5)


def test_recipe_schedules_endpoints() -> None:
    s = build_schedules(total_iters=1000, lr=4e-3, min_lr=1e-6, warmup_iters=100, weight_decay=0.04,
                        weight_decay_end=0.4, momentum_teacher=0.992, final_momentum_teacher=1.0,
                        teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_iters=300,
                        freeze_last_layer_iters=50)
    assert s.lr(0) == 0.0 and s.lr(99) == pytest.approx(4e-3) and s.lr(999) == pytest.approx(1e-6, abs=1e-7)
    assert s.weight_decay(0) == pytest.approx(0.04) and s.weight_decay(5000) == 0.4
    assert s.momentum(0) == pytest.approx(0.992) and s.momentum(1000) == 1.0
    assert s.teacher_temp(0) == pytest.approx(0.04) and s.teacher_temp(299) == pytest.approx(0.07)
    assert s.teacher_temp(300) == s.teacher_temp(900) == 0.07
    # Official: the lr schedule with its first 50 values zeroed, not shifted by the freeze.
    assert s.last_layer_lr(49) == 0.0 and s.lr(50) > 0.0 and s.last_layer_lr(50) == pytest.approx(s.lr(50))
    assert s.last_layer_lr(99) == pytest.approx(4e-3)
    # weight decay rises along a half cosine: the midpoint is the mean of the ends
    assert s.weight_decay(500) == pytest.approx(0.22)


def test_last_layer_lr_is_the_official_zeroed_lr_schedule() -> None:
    """The default recipe (100 epochs of 1,250 iterations, 10 warm-up, 1 frozen) against the official
    construction: ``CosineScheduler(**lr)`` then ``schedule[:freeze] = 0``."""
    total, warmup, freeze = 125_000, 12_500, 1_250
    s = build_schedules(total_iters=total, lr=4e-3, min_lr=1e-6, warmup_iters=warmup, weight_decay=0.04,
                        weight_decay_end=0.4, momentum_teacher=0.992, final_momentum_teacher=1.0,
                        teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_iters=37_500,
                        freeze_last_layer_iters=freeze)
    official = reference_schedule(4e-3, 1e-6, total, warmup, 0.0, 0)
    official[:freeze] = 0.0
    for it in (0, 1_249, 1_250, 5_000, 12_499, 12_500, 60_000, 124_999):
        assert s.last_layer_lr(it) == pytest.approx(official[it], rel=1e-9, abs=1e-15)
    assert s.last_layer_lr(1_250) == pytest.approx(4.0e-4, rel=1e-3)
    assert s.last_layer_lr(12_500) == pytest.approx(4.0e-3)


def test_lr_scaling_rule() -> None:
    assert scaled_lr(2e-4, 3072) == pytest.approx(2e-4 * math.sqrt(3))
    assert scaled_lr(1e-3, 512, "linear_wrt_256") == pytest.approx(2e-3)
    with pytest.raises(ValueError, match="unknown lr scaling rule"):
        scaled_lr(1.0, 1, "cubic")


class TinyBackbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 2, 4))
        self.patch_embed = nn.Conv2d(3, 4, 2)
        self.blocks = nn.ModuleList([nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(3)])
        self.ls = nn.ModuleList()
        self.norm = nn.LayerNorm(4)


def test_layer_ids() -> None:
    assert layer_id("backbone.pos_embed", 12) == 0
    assert layer_id("backbone.patch_embed.proj.weight", 12) == 0
    assert layer_id("backbone.register_tokens", 12) == 0
    assert layer_id("backbone.blocks.0.attn.qkv.weight", 12) == 1
    assert layer_id("backbone.blocks.11.mlp.fc1.bias", 12) == 12
    assert layer_id("backbone.norm.weight", 12) == 13


def test_param_groups_multipliers_and_apply() -> None:
    backbone = TinyBackbone()
    head = nn.Sequential(nn.Linear(4, 4))
    head.add_module("last_layer", nn.Linear(4, 8, bias=False))
    groups = build_param_groups({"backbone": backbone, "dino_head": head}, num_layers=3, layerwise_decay=0.5,
                                patch_embed_lr_mult=0.2)
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(backbone.patch_embed.weight)]["lr_multiplier"] == pytest.approx(0.5**4 * 0.2)
    assert by_param[id(backbone.patch_embed.bias)]["wd_multiplier"] == 0.0
    assert by_param[id(backbone.cls_token)]["lr_multiplier"] == pytest.approx(0.5**4)
    assert by_param[id(backbone.blocks[0][1].weight)]["lr_multiplier"] == pytest.approx(0.5**3)
    assert by_param[id(backbone.blocks[2][1].weight)]["lr_multiplier"] == pytest.approx(0.5)
    assert by_param[id(backbone.blocks[2][0].weight)]["wd_multiplier"] == 0.0  # a norm named '0': 1-D rule
    assert by_param[id(backbone.norm.weight)]["lr_multiplier"] == 1.0
    assert by_param[id(head[0].weight)]["lr_multiplier"] == 1.0
    assert by_param[id(head.last_layer.weight)]["is_last_layer"]
    assert sum(len(g["params"]) for g in groups) == len(list(backbone.parameters())) + len(list(head.parameters()))
    apply_schedules(groups, lr=1.0, wd=0.1, last_layer_lr=0.0)
    assert by_param[id(head.last_layer.weight)]["lr"] == 0.0
    assert by_param[id(backbone.blocks[2][1].weight)]["lr"] == pytest.approx(0.5)
    assert by_param[id(backbone.blocks[2][1].weight)]["weight_decay"] == pytest.approx(0.1)


def test_ema_update_closed_form() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    before = {k: v.clone().double() for k, v in teacher.state_dict().items()}
    update_teacher(student, teacher, momentum=0.9)
    for key, value in teacher.state_dict().items():
        expected = 0.9 * before[key] + 0.1 * student.state_dict()[key].double()
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-7)
    update_teacher(student, teacher, momentum=1.0)  # momentum 1 freezes the teacher
    with pytest.raises(ValueError, match="momentum"):
        update_teacher(student, teacher, momentum=1.5)
