"""Batched multi-crop: each op against torchvision, crop boxes and crop statistics against the per-sample path,
keys (not batches) decide the crops, and the engine trains and resumes exactly on the batched path."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from scipy import stats
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from components.data.batched_multicrop import (
    BatchAugmenter,
    BatchedMultiCrop,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    counter_uniforms,
    gaussian_blur,
    grayscale,
    pad_to_canvas,
    raw_sample,
    resized_crop_boxes,
)
from components.data.multicrop import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, DataAugmentationDINO, MultiCropConfig
from components.train.engine import run_pretraining
from tests.test_pretrain_engine import CPU, tiny_config, weights, write_pool

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)


def colour_images(n: int = 6, size: int = 20) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))  # (N, 3, H, W) in [0, 1]


@pytest.mark.parametrize(("ours", "theirs", "factors"), [
    (adjust_brightness, TF.adjust_brightness, [0.6, 1.0, 1.4]),
    (adjust_contrast, TF.adjust_contrast, [0.6, 1.0, 1.4]),
    (adjust_saturation, TF.adjust_saturation, [0.8, 1.0, 1.2]),
    (adjust_hue, TF.adjust_hue, [-0.1, 0.0, 0.07]),
])
def test_each_colour_op_equals_torchvision_with_a_factor_per_image(ours, theirs, factors) -> None:  # type: ignore[no-untyped-def]
    images = colour_images(3)
    got = ours(images, torch.tensor(factors))
    for i, factor in enumerate(factors):
        torch.testing.assert_close(got[i], theirs(images[i], factor), atol=2e-5, rtol=0)


def test_grayscale_and_blur_equal_torchvision() -> None:
    images = colour_images(3)
    torch.testing.assert_close(grayscale(images), TF.rgb_to_grayscale(images), atol=1e-6, rtol=0)
    sigmas = [0.3, 1.0, 2.0]
    got = gaussian_blur(images, torch.tensor(sigmas), 9)
    for i, sigma in enumerate(sigmas):
        torch.testing.assert_close(got[i], TF.gaussian_blur(images[i], [9, 9], [sigma, sigma]), atol=1e-5, rtol=0)


def test_crop_boxes_follow_random_resized_crop() -> None:
    """Area share and aspect ratio of 4,000 boxes against torchvision's own get_params (two-sample KS)."""
    n, height, width = 4000, 60, 80
    u = counter_uniforms(0, np.arange(n), crop=0)
    boxes = resized_crop_boxes(u, torch.full((n,), height), torch.full((n,), width), (0.08, 1.0))
    ours_w, ours_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((boxes[:, 0] >= 0).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())
    torch.manual_seed(0)
    image = torch.zeros(3, height, width)
    reference = [v2.RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3]) for _ in range(n)]
    ref_h = np.array([h for _, _, h, _ in reference], dtype=float)
    ref_w = np.array([w for _, _, _, w in reference], dtype=float)
    for ours, theirs in ((ours_w * ours_h / (height * width), ref_w * ref_h / (height * width)),
                         (ours_w / ours_h, ref_w / ref_h)):
        assert stats.ks_2samp(ours.numpy(), theirs).statistic < 0.05


def test_full_box_without_jitter_returns_the_image() -> None:
    """roi_align with aligned=True over the whole image at its own size samples exactly its pixels."""
    config = MultiCropConfig(global_crops_size=16, local_crops_size=8, global_crops_scale=(1.0, 1.0),
                             local_crops_number=0, flip_p=0.0, color_jitter_p=0.0, grayscale_p=0.0,
                             blur_p_global1=0.0, blur_p_global2=0.0, solarize_p_global2=0.0)
    images = (colour_images(4, 16) * 255).round().to(torch.uint8)
    global_crops, _ = BatchedMultiCrop(config)(images, torch.tensor([[16, 16]] * 4), np.arange(4))
    expected = (images.float() / 255 - MEAN) / STD
    torch.testing.assert_close(global_crops[:4], expected, atol=1e-5, rtol=0)


def test_a_samples_crops_depend_on_its_key_not_on_its_batch() -> None:
    config = MultiCropConfig(global_crops_size=16, local_crops_size=8, local_crops_number=2)
    augment = BatchedMultiCrop(config)
    images = (colour_images(3, 24) * 255).to(torch.uint8)
    sizes = torch.tensor([[24, 24]] * 3)
    whole_g, whole_l = augment(images, sizes, [10, 11, 12])
    alone_g, alone_l = augment(images[2:], sizes[2:], [12])
    torch.testing.assert_close(alone_g[0], whole_g[2], atol=1e-6, rtol=0)  # first global crop of key 12
    torch.testing.assert_close(alone_g[1], whole_g[5], atol=1e-6, rtol=0)  # second global crop
    torch.testing.assert_close(alone_l[1], whole_l[5], atol=1e-6, rtol=0)  # second local crop
    other_g, _ = augment(images[2:], sizes[2:], [13])
    assert not torch.allclose(other_g[0], whole_g[2])


def test_mixed_sizes_are_padded_and_boxes_stay_inside_each_image() -> None:
    small = torch.full((3, 10, 14), 200, dtype=torch.uint8)
    large = torch.zeros((3, 30, 20), dtype=torch.uint8)
    canvas, sizes = pad_to_canvas([small, large])
    assert canvas.shape == (2, 3, 30, 20) and sizes.tolist() == [[10, 14], [30, 20]]
    config = MultiCropConfig(global_crops_size=8, local_crops_size=4, local_crops_number=2, color_jitter_p=0.0,
                             grayscale_p=0.0, blur_p_global1=0.0, blur_p_global2=0.0, solarize_p_global2=0.0)
    global_crops, local_crops = BatchedMultiCrop(config)(canvas, sizes, [0, 1])
    level = (200 / 255 - MEAN) / STD  # a crop of the uniform small image sees only its own value
    torch.testing.assert_close(global_crops[0], level[0].expand(3, 8, 8), atol=1e-5, rtol=0)
    torch.testing.assert_close(local_crops[0], level[0].expand(3, 4, 4), atol=1e-5, rtol=0)


def photo(size: int = 28) -> PIL.Image.Image:
    """A grey garment-like image with a left-right asymmetry, so flips and crops move the statistics."""
    rows, cols = np.mgrid[0:size, 0:size]
    pixels = np.where((cols > 5) & (cols < 22) & (rows > 3), 80 + 6 * cols, 0)
    return PIL.Image.fromarray(pixels.clip(0, 255).astype(np.uint8), mode="L")


def crop_statistics(crops: torch.Tensor) -> dict[str, np.ndarray]:
    """Per-crop statistics on the 0..1 scale: mean, std and the left-minus-right half means (flip-sensitive)."""
    x = (crops * STD + MEAN).mean(dim=1)  # (N, H, W)
    half = x.shape[-1] // 2
    return {"mean": x.mean(dim=(1, 2)).numpy(), "std": x.std(dim=(1, 2)).numpy(),
            "left_minus_right": (x[..., :half].mean(dim=(1, 2)) - x[..., -half:].mean(dim=(1, 2))).numpy()}


@pytest.mark.slow
def test_crop_statistics_match_the_per_sample_path() -> None:
    """Same image, 400 draws through both paths: every per-crop statistic agrees in distribution (KS)."""
    config = MultiCropConfig(global_crops_size=28, local_crops_size=12, local_crops_number=2)
    image, n = photo(), 400
    per_sample = DataAugmentationDINO(config)
    outputs = [per_sample(image, generator_seed=i) for i in range(n)]
    reference = {
        "global1": torch.stack([o["global_crops"][0] for o in outputs]),
        "global2": torch.stack([o["global_crops"][1] for o in outputs]),
        "local": torch.stack([o["local_crops"][0] for o in outputs]),
    }
    sample = raw_sample(image, 0).image
    global_crops, local_crops = BatchedMultiCrop(config)(sample.expand(n, -1, -1, -1).contiguous(),
                                                         torch.tensor([[28, 28]] * n), np.arange(n))
    batched = {"global1": global_crops[:n], "global2": global_crops[n:], "local": local_crops[:n]}
    for crop in reference:
        ours, theirs = crop_statistics(batched[crop]), crop_statistics(reference[crop])
        for name in ours:
            result = stats.ks_2samp(ours[name], theirs[name])
            assert result.pvalue > 1e-3, f"{crop} {name}: KS {result.statistic:.3f} p={result.pvalue:.2g}"


def test_batch_augmenter_is_the_collate_of_raw_samples() -> None:
    config = MultiCropConfig(global_crops_size=16, local_crops_size=8, local_crops_number=3)
    samples = [raw_sample(photo(20), key) for key in (5, 6)]
    crops = BatchAugmenter(config)(samples)
    assert crops.global_crops.shape == (4, 3, 16, 16) and crops.local_crops.shape == (6, 3, 8, 8)


def batched(cfg):  # type: ignore[no-untyped-def]
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augmentation="batched"))


def test_engine_trains_on_the_batched_path_and_resumes_exactly(tmp_path: Path) -> None:
    manifest = write_pool(tmp_path)
    straight_result, straight = run_pretraining(batched(tiny_config(manifest, tmp_path / "a")), CPU, tmp_path)
    assert straight_result.finished and straight_result.skipped_images >= 1
    assert all(np.isfinite(v) for v in straight_result.last_losses.values())
    first, _ = run_pretraining(batched(tiny_config(manifest, tmp_path / "b", max_steps=3)), CPU, tmp_path)
    assert first.end_step == 3
    _, resumed = run_pretraining(batched(tiny_config(manifest, tmp_path / "b")), CPU, tmp_path)
    expected, got = weights(straight), weights(resumed)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def test_after_step_hook_stops_training_with_a_checkpoint(tmp_path: Path) -> None:
    cfg = batched(tiny_config(write_pool(tmp_path, corrupt=False), tmp_path / "out", iterations=10))
    seen: list[int] = []

    def stop_after_three(steps_done: int, _model: object) -> bool:
        seen.append(steps_done)
        return steps_done == 3

    result, _ = run_pretraining(cfg, CPU, tmp_path, after_step=stop_after_three)
    assert seen == [1, 2, 3] and result.end_step == 3 and not result.finished
    assert result.checkpoint is not None and result.checkpoint.name == "step_000000003"
