"""The student/teacher meta-architecture: one objective step on real-shaped multi-crop batches."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from components.data.collate import collate_data_and_cast
from components.data.masking import MaskingGenerator
from components.data.multicrop import DataAugmentationDINO, MultiCropConfig
from components.models import BackboneConfig
from components.ssl.config import HeadConfig, ObjectiveConfig
from components.ssl.meta_arch import SSLMetaArch

GRID = 7  # 28 px / patch 4


def make_batch(n_images: int = 4, n_local: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    augment = DataAugmentationDINO(MultiCropConfig(global_crops_size=28, local_crops_size=12,
                                                   local_crops_number=n_local))
    images = [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)) for _ in range(n_images)]
    samples = [augment(image, generator_seed=i) for i, image in enumerate(images)]
    batch = collate_data_and_cast(samples, (0.1, 0.5), 0.5, n_tokens=GRID * GRID,
                                  mask_generator=MaskingGenerator(GRID, max_num_patches=24), rng=random.Random(seed))
    return dict(batch)  # type: ignore[arg-type]


def make_model(centering: str = "sinkhorn_knopp", separate_head: bool = False, packed: bool = True,
               drop_path: float = 0.0, registers: int = 0) -> SSLMetaArch:
    torch.manual_seed(0)
    objective = ObjectiveConfig(precision="fp32", packed_forward=packed)
    head = HeadConfig(n_prototypes=64, hidden_dim=32, bottleneck_dim=16)
    objective.dino.head = head
    objective.ibot.head = HeadConfig(n_prototypes=48, hidden_dim=32, bottleneck_dim=16)
    objective.ibot.separate_head = separate_head
    objective.teacher.centering = centering  # type: ignore[assignment]
    backbone = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, drop_path_rate=drop_path,
                              num_register_tokens=registers, layerscale_init=0.1)
    return SSLMetaArch(backbone, objective).train()


@pytest.mark.parametrize(("centering", "separate_head"),
                         [("sinkhorn_knopp", False), ("sinkhorn_knopp", True), ("centering", False)])
def test_forward_backward_terms_and_gradients(centering: str, separate_head: bool) -> None:
    model = make_model(centering, separate_head)
    losses = model.forward_backward(make_batch(), teacher_temp=0.04)
    assert set(losses) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss", "total_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    # The logged KoLeo and iBOT terms are halved as the official logs; the total is the real sum.
    expected = (losses["dino_local_crops_loss"] + losses["dino_global_crops_loss"]
                + 2 * losses["koleo_loss"] + 2 * losses["ibot_loss"])
    torch.testing.assert_close(losses["total_loss"], expected)
    trainable = [p for p in model.student.parameters() if p.requires_grad]
    assert all(p.grad is not None for p in trainable)
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    if separate_head:
        assert "ibot_head" in model.student and model.student["ibot_head"].last_layer is not None


def test_teacher_starts_as_student_and_stays_in_eval() -> None:
    model = make_model(drop_path=0.2)
    for (name, s), (_, t) in zip(model.student.state_dict().items(), model.teacher.state_dict().items(), strict=True):
        assert torch.equal(s, t), name
    assert model.student.training and not model.teacher.training


def test_packed_and_per_crop_forward_give_the_same_losses() -> None:
    batch = make_batch()
    packed = make_model(packed=True, registers=4).forward_backward(batch, 0.05, backward=False)
    per_crop = make_model(packed=False, registers=4).forward_backward(batch, 0.05, backward=False)
    for key in packed:
        torch.testing.assert_close(packed[key], per_crop[key], rtol=1e-4, atol=1e-5)


def test_no_local_crops_and_no_masks() -> None:
    model = make_model()
    batch = make_batch(n_local=0)
    batch["collated_masks"][:] = False
    batch["mask_indices_list"] = batch["mask_indices_list"][:0]
    batch["masks_weight"] = batch["masks_weight"][:0]
    batch["n_masked_patches"] = torch.zeros(1, dtype=torch.long)
    losses = model.forward_backward(batch, 0.04)
    # No masked token: the iBOT term is an exact 0 (its collectives still ran), never skipped or NaN.
    assert "dino_local_crops_loss" not in losses and float(losses["ibot_loss"]) == 0.0
    assert torch.isfinite(losses["total_loss"])


def test_a_few_steps_on_a_fixed_batch_lower_the_loss() -> None:
    model = make_model()
    batch = make_batch(n_images=8)
    optimizer = torch.optim.AdamW(model.param_groups(), lr=0.0)
    for group in optimizer.param_groups:
        group["lr"] = 2e-3 * group["lr_multiplier"]
    first = None
    for _ in range(8):
        optimizer.zero_grad(set_to_none=True)
        losses = model.forward_backward(batch, 0.04)
        first = first if first is not None else float(losses["total_loss"])
        model.clip_gradients(3.0)
        optimizer.step()
        model.update_teacher(0.9)
    assert float(model.forward_backward(batch, 0.04, backward=False)["total_loss"]) < first


def test_bf16_autocast_runs_on_cpu() -> None:
    model = make_model()
    model.objective.precision = "bf16"
    losses = model.forward_backward(make_batch(), 0.04)
    assert all(torch.isfinite(v) for v in losses.values())


def test_bf16_on_cpu_gives_the_fp32_losses_and_gradients_to_bf16_accuracy() -> None:
    """The CPU bf16 path (autocast on the forward passes) against fp32 on the same weights and batch."""
    batch = make_batch()
    results = {}
    for precision in ("fp32", "bf16"):
        model = make_model()
        model.objective.precision = precision  # type: ignore[assignment]
        losses = model.forward_backward(batch, 0.04)
        grads = torch.cat([p.grad.flatten() for p in model.student.parameters() if p.grad is not None])
        results[precision] = (losses, grads)
    (fp32_losses, fp32_grads), (bf16_losses, bf16_grads) = results["fp32"], results["bf16"]
    for name in fp32_losses:
        torch.testing.assert_close(bf16_losses[name], fp32_losses[name], rtol=2e-2, atol=2e-2, msg=name)
    cosine = torch.nn.functional.cosine_similarity(bf16_grads, fp32_grads, dim=0)
    assert float(cosine) > 0.99  # bf16 has an 8-bit mantissa: same direction, not the same bits


def test_auto_precision_picks_bf16_only_where_it_pays(monkeypatch: pytest.MonkeyPatch) -> None:
    from components.ssl import meta_arch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert meta_arch.resolve_precision("fp32", cuda) == "fp32"
    assert meta_arch.resolve_precision("auto", cuda) == "bf16"
    monkeypatch.setattr(meta_arch, "cpu_has_fast_bf16", lambda: True)
    assert meta_arch.resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(meta_arch, "cpu_has_fast_bf16", lambda: False)
    assert meta_arch.resolve_precision("auto", cpu) == "fp32"
    assert isinstance(meta_arch.cpu_has_fast_bf16.__call__(), bool)
