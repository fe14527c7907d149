"""DINOv2 multi-crop augmentation: official defaults, shapes, seeding, normalisation, per-crop probabilities."""

from __future__ import annotations

import dataclasses
import pickle
import random

import numpy as np
import PIL.Image
import pytest
import torch

from components.config.loader import ConfigError, from_mapping
from components.data.multicrop import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    DataAugmentationDINO,
    MultiCropConfig,
    MultiCropOutput,
    blur_kernel_for,
    fashion_mnist_config,
)

MEAN = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)


def rgb_photo(height: int = 250, width: int = 330) -> PIL.Image.Image:
    """A synthetic RGB image: colour gradients plus seeded noise."""
    rows, cols = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(0).integers(0, 60, (height, width, 3))
    pixels = np.stack([rows * 200 // height, cols * 200 // width, (rows + cols) * 100 // (height + width)], -1)
    return PIL.Image.fromarray((pixels + noise).clip(0, 255).astype(np.uint8), mode="RGB")


def fashion_mnist_like() -> PIL.Image.Image:
    """A 28×28 single-channel image like Fashion-MNIST: a bright textured garment on black."""
    pixels = np.zeros((28, 28), dtype=np.uint8)
    texture = np.random.default_rng(1).integers(150, 230, (28, 28)).astype(np.uint8)
    body = (slice(7, 26), slice(8, 20))
    sleeves = (slice(7, 15), slice(3, 25))
    for region in (body, sleeves):
        pixels[region] = texture[region]
    return PIL.Image.fromarray(pixels, mode="L")


def all_crops(out: MultiCropOutput) -> list[torch.Tensor]:
    return [*out["global_crops"], *out["local_crops"]]


def unnormalise(crop: torch.Tensor) -> torch.Tensor:
    return crop * STD + MEAN  # (3, H, W) back in [0, 1]


def quiet(**overrides: object) -> MultiCropConfig:
    """A config with every photometric op off unless overridden (to isolate one op)."""
    base = {"color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p_global1": 0.0, "blur_p_global2": 0.0,
            "blur_p_local": 0.0, "solarize_p_global2": 0.0}
    return MultiCropConfig(**{**base, **overrides})  # type: ignore[arg-type]


# ---------------------------------------------------------------- config


def test_defaults_are_the_official_values() -> None:
    config = MultiCropConfig()
    assert (config.global_crops_size, config.local_crops_size, config.local_crops_number) == (224, 96, 8)
    assert config.global_crops_scale == (0.32, 1.0) and config.local_crops_scale == (0.05, 0.32)
    assert config.interpolation == "bicubic" and config.flip_p == 0.5
    jitter = (config.color_jitter_brightness, config.color_jitter_contrast, config.color_jitter_saturation,
              config.color_jitter_hue)
    assert jitter == (0.4, 0.4, 0.2, 0.1) and config.color_jitter_p == 0.8 and config.grayscale_p == 0.2
    assert (config.blur_p_global1, config.blur_p_global2, config.blur_p_local) == (1.0, 0.1, 0.5)
    assert config.blur_sigma == (0.1, 2.0) and config.blur_kernel_size == 9
    assert config.solarize_threshold == 128 and config.solarize_p_global2 == 0.2
    assert config.normalize_mean == (0.485, 0.456, 0.406) and config.normalize_std == (0.229, 0.224, 0.225)
    config.validate()
    fashion = fashion_mnist_config()
    assert (fashion.global_crops_size, fashion.local_crops_size) == (28, 12)
    fashion.validate()


@pytest.mark.parametrize("overrides", [
    {"global_crops_size": 0}, {"local_crops_size": -4}, {"global_crops_scale": (0.0, 1.0)},
    {"global_crops_scale": (0.5, 1.2)}, {"local_crops_scale": (0.4, 0.2)}, {"local_crops_scale": (0.1,)},
    {"local_crops_number": -1}, {"flip_p": 1.5}, {"blur_p_local": -0.1}, {"blur_kernel_size": 8},
    {"blur_sigma": (0.0, 2.0)}, {"blur_sigma": (2.0, 1.0)}, {"color_jitter_hue": 0.7},
    {"solarize_threshold": 300.0}, {"normalize_std": (0.2, 0.2, 0.0)}, {"normalize_mean": (0.5, 0.5)},
    {"in_chans_mode": "rgba"}, {"blur_p_semantics": "inverted"},
])
def test_validate_rejects_bad_values(overrides: dict) -> None:
    config = dataclasses.replace(MultiCropConfig(), **overrides)
    with pytest.raises(ValueError):
        config.validate()
    with pytest.raises(ValueError):
        DataAugmentationDINO(config)


def test_yaml_lists_become_tuples_and_bad_values_name_the_key() -> None:
    config = from_mapping(MultiCropConfig, {"global_crops_size": 28, "local_crops_size": 12,
                                            "global_crops_scale": [0.4, 1.0]})
    assert config.global_crops_scale == (0.4, 1.0)
    with pytest.raises(ConfigError, match="local_crops_scale"):
        from_mapping(MultiCropConfig, {"local_crops_scale": [0.5, 0.1]})


@pytest.mark.parametrize(("crop", "kernel"), [(224, 9), (96, 9), (28, 9), (12, 9), (9, 9), (8, 7), (4, 3), (2, 1),
                                              (1, 1)])
def test_blur_kernel_is_official_when_it_fits_and_clamped_to_an_odd_size_that_fits_otherwise(
    crop: int, kernel: int
) -> None:
    assert blur_kernel_for(crop, 9) == kernel


# ---------------------------------------------------------------- shapes


def test_official_sizes_on_an_rgb_photo() -> None:
    out = DataAugmentationDINO(MultiCropConfig())(rgb_photo(), generator_seed=0)
    assert [c.shape for c in out["global_crops"]] == [(3, 224, 224)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 96, 96)] * 8
    assert out["global_crops_teacher"][0] is out["global_crops"][0]
    assert out["global_crops_teacher"][1] is out["global_crops"][1]
    assert out["offsets"] == ()
    for crop in all_crops(out):
        assert type(crop) is torch.Tensor and crop.dtype == torch.float32 and torch.isfinite(crop).all()
        pixels = unnormalise(crop)
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_fashion_mnist_preset_turns_a_grey_image_into_three_equal_channels() -> None:
    out = DataAugmentationDINO(fashion_mnist_config())(fashion_mnist_like(), generator_seed=0)
    assert [c.shape for c in out["global_crops"]] == [(3, 28, 28)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 12, 12)] * 8
    for crop in all_crops(out):
        assert crop.dtype == torch.float32
        pixels = unnormalise(crop)  # (3, H, W)
        # Grey in, grey out: saturation, hue and grayscale cannot separate the replicated channels.
        assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)


@pytest.mark.parametrize("image", [
    torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
    torch.rand((1, 28, 28), generator=torch.Generator().manual_seed(0)),
    torch.rand((3, 28, 28), generator=torch.Generator().manual_seed(0)),
])
def test_tensor_inputs_give_the_same_shapes(image: torch.Tensor) -> None:
    out = DataAugmentationDINO(fashion_mnist_config())(image, generator_seed=0)
    assert [c.shape for c in out["global_crops"]] == [(3, 28, 28)] * 2
    assert [c.shape for c in out["local_crops"]] == [(3, 12, 12)] * 8


def test_require_rgb_refuses_single_channel_inputs() -> None:
    augment = DataAugmentationDINO(dataclasses.replace(fashion_mnist_config(), in_chans_mode="require_rgb"))
    with pytest.raises(ValueError, match="mode"):
        augment(fashion_mnist_like())
    with pytest.raises(ValueError, match="1 channel"):
        augment(torch.zeros(1, 28, 28, dtype=torch.uint8))
    assert augment(fashion_mnist_like().convert("RGB"))["global_crops"][0].shape == (3, 28, 28)


# ---------------------------------------------------------------- seeding


@pytest.mark.parametrize(
    "image", [fashion_mnist_like(), torch.rand((3, 28, 28), generator=torch.Generator().manual_seed(2))]
)
def test_same_seed_same_crops_different_seed_different_crops(image: PIL.Image.Image | torch.Tensor) -> None:
    augment = DataAugmentationDINO(fashion_mnist_config())
    torch.manual_seed(0)
    first = all_crops(augment(image, generator_seed=42))
    torch.manual_seed(999)  # the caller's global state must not matter
    _ = torch.rand(10)
    again = all_crops(augment(image, generator_seed=42))
    other = all_crops(augment(image, generator_seed=43))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_a_seeded_call_leaves_the_global_generators_untouched() -> None:
    augment = DataAugmentationDINO(fashion_mnist_config())
    torch.manual_seed(5)
    state = torch.get_rng_state()
    py_state, np_state = random.getstate(), pickle.dumps(np.random.get_state())
    augment(fashion_mnist_like(), generator_seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert random.getstate() == py_state and pickle.dumps(np.random.get_state()) == np_state
    expected_next = torch.rand(4)
    torch.set_rng_state(state)
    assert torch.equal(torch.rand(4), expected_next)


def test_an_unseeded_call_draws_from_the_global_generator_like_the_official_code() -> None:
    augment = DataAugmentationDINO(fashion_mnist_config())
    torch.manual_seed(3)
    first = all_crops(augment(fashion_mnist_like()))
    torch.manual_seed(3)
    again = all_crops(augment(fashion_mnist_like()))
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


# ---------------------------------------------------------------- normalisation


def test_constant_image_without_photometric_ops_normalises_exactly() -> None:
    colour = (200, 100, 50)
    image = PIL.Image.new("RGB", (40, 40), colour)
    out = DataAugmentationDINO(quiet(global_crops_size=16, local_crops_size=8))(image, generator_seed=0)
    expected = (torch.tensor(colour, dtype=torch.float32).view(3, 1, 1) / 255 - MEAN) / STD
    for crop in all_crops(out):
        assert torch.allclose(crop, expected.expand_as(crop), atol=1e-5)
    at_mean = PIL.Image.new("RGB", (40, 40), tuple(round(255 * m) for m in IMAGENET_DEFAULT_MEAN))
    for crop in all_crops(DataAugmentationDINO(quiet(global_crops_size=16, local_crops_size=8))(at_mean)):
        assert crop.abs().max() < 0.5 / 255 / min(IMAGENET_DEFAULT_STD) + 1e-6  # zero up to 8-bit rounding


def test_constant_grey_image_stays_within_the_brightness_jitter_range_with_official_ops() -> None:
    # Contrast, saturation, hue, grayscale and blur leave a constant grey image as it is; brightness
    # scales it by a factor in [0.6, 1.4]; solarize maps 128 to 127. So each crop is constant, and its
    # normalised value is bounded.
    augment = DataAugmentationDINO(MultiCropConfig(global_crops_size=16, local_crops_size=8))
    image = PIL.Image.new("L", (32, 32), 128)
    low, high = (127 * 0.6 - 1) / 255, (128 * 1.4 + 1) / 255
    for seed in range(20):
        for crop in all_crops(augment(image, generator_seed=seed)):
            pixels = unnormalise(crop)
            assert pixels.std() < 1e-5
            assert low <= pixels.mean() <= high


# ---------------------------------------------------------------- per-crop probabilities


def binomial_bounds(n: int, p: float, sds: float = 4.5) -> tuple[float, float]:
    spread = sds * (n * p * (1 - p)) ** 0.5
    return n * p - spread, n * p + spread


def test_solarize_touches_only_the_second_global_crop_at_its_rate() -> None:
    # Constant 200 >= threshold 128: solarized crops read 55, the others 200.
    config = quiet(global_crops_size=8, local_crops_size=4, local_crops_number=2, solarize_p_global2=0.2)
    augment = DataAugmentationDINO(config)
    image = PIL.Image.new("RGB", (8, 8), (200, 200, 200))
    draws = 400
    solarized = np.zeros(4, dtype=int)  # global1, global2, local1, local2
    for seed in range(draws):
        for i, crop in enumerate(all_crops(augment(image, generator_seed=seed))):
            value = unnormalise(crop).mean().item() * 255
            assert value == pytest.approx(200, abs=0.5) or value == pytest.approx(55, abs=0.5)
            solarized[i] += value < 128
    assert solarized[0] == 0 and solarized[2] == 0 and solarized[3] == 0
    low, high = binomial_bounds(draws, 0.2)
    assert low <= solarized[1] <= high


@pytest.mark.parametrize(("semantics", "rates"), [("apply", (1.0, 0.1, 0.5)), ("official_code", (0.0, 0.9, 0.5))])
def test_blur_rates_per_crop(semantics: str, rates: tuple[float, float, float]) -> None:
    # A 1-px checkerboard, crops covering the whole image with no flip, sigma >= 1: any blur is obvious,
    # and an unblurred crop is the checkerboard exactly. Crops of 8 px also exercise the kernel clamp (9 -> 7).
    config = quiet(global_crops_size=8, local_crops_size=8, local_crops_number=2, global_crops_scale=(1.0, 1.0),
                   local_crops_scale=(1.0, 1.0), flip_p=0.0, blur_sigma=(1.0, 2.0), blur_p_global1=1.0,
                   blur_p_global2=0.1, blur_p_local=0.5, blur_p_semantics=semantics)
    augment = DataAugmentationDINO(config)
    board = ((np.indices((8, 8)).sum(0) % 2) * 255).astype(np.uint8)
    image = PIL.Image.fromarray(np.stack([board] * 3, -1), mode="RGB")
    sharp = (torch.from_numpy(board).float() / 255 - MEAN) / STD  # (3, 8, 8)
    draws = 200
    blurred = np.zeros(3, dtype=int)  # global1, global2, locals (2 per draw)
    for seed in range(draws):
        crops = all_crops(augment(image, generator_seed=seed))
        for i, crop in enumerate(crops):
            is_blurred = (crop - sharp).abs().max().item() > 0.5
            if not is_blurred:
                assert torch.allclose(crop, sharp, atol=1e-5)
            blurred[min(i, 2)] += is_blurred
    for count, rate, n in zip(blurred, rates, (draws, draws, 2 * draws), strict=True):
        if rate in (0.0, 1.0):
            assert count == rate * n
        else:
            low, high = binomial_bounds(n, rate)
            assert low <= count <= high, (count, rate, n)
