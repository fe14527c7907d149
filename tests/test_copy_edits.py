"""The copy-edit family: each edit keeps its promises (size, mode, strength limits) and is seeded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from components.curation import copy_edits
from components.curation.copy_edits import EDIT_NAMES, EDITS, CopyEditConfig, random_copy


def grey_image(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    """Smooth structure plus noise: every edit changes it visibly."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = 127 + 60 * np.sin(x / 4.0) * np.cos(y / 5.0) + rng.normal(0, 10, (height, width))  # (H, W)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")


def rgb_image(width: int = 48, height: int = 36) -> Image.Image:
    channels = [np.asarray(grey_image(width, height, seed)) for seed in range(3)]
    return Image.fromarray(np.stack(channels, axis=-1), mode="RGB")  # (H, W, 3)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("name", [n for n in EDIT_NAMES if n != "rescale"])
@pytest.mark.parametrize("make", [grey_image, rgb_image])
def test_every_edit_but_rescale_keeps_size_and_mode(name: str, make: object) -> None:
    image = make()  # type: ignore[operator]
    out = EDITS[name](image, rng(), CopyEditConfig())
    assert out.size == image.size and out.mode == image.mode


@pytest.mark.parametrize("name", EDIT_NAMES)
def test_every_edit_is_deterministic_by_seed(name: str) -> None:
    image, cfg = rgb_image(), CopyEditConfig()
    first, again = EDITS[name](image, rng(3), cfg), EDITS[name](image, rng(3), cfg)
    assert first.tobytes() == again.tobytes()
    if name != "flip":  # flip draws nothing; the others draw their strength
        outputs = {EDITS[name](image, rng(seed), cfg).tobytes() for seed in range(6)}
        assert len(outputs) > 1


def test_crop_keeps_at_least_one_minus_max_crop_of_each_side() -> None:
    for seed in range(200):
        left, top, right, bottom = copy_edits.crop_box((50, 40), rng(seed), 0.2)
        assert 0 <= left < right <= 50 and 0 <= top < bottom <= 40
        assert right - left >= 40 and bottom - top >= 32  # (1 - 0.2) of 50 and of 40
    sides = [copy_edits.crop_box((50, 40), rng(seed), 0.2) for seed in range(200)]
    assert min(r - left for left, _, r, _ in sides) == 40  # the limit is reached, not just respected
    image = grey_image()
    assert copy_edits.crop(image, rng(), CopyEditConfig(max_crop=0.0)).tobytes() == image.tobytes()


def test_crop_moves_content_like_a_crop() -> None:
    # A vertical bar at x=20 of a 40 px wide image: after cutting columns on the left it sits further left.
    bar = np.zeros((30, 40), dtype=np.uint8)
    bar[:, 20] = 255
    image = Image.fromarray(bar, mode="L")
    for seed in range(20):
        box = copy_edits.crop_box(image.size, rng(seed), 0.2)
        out = copy_edits.crop(image, rng(seed), CopyEditConfig())
        expected = (20 - box[0]) * 40 / (box[2] - box[0])  # the bar's column after the crop and resize back
        assert abs(int(np.argmax(pixels(out).sum(axis=0))) - expected) <= 1.0


def test_rescale_factor_stays_within_its_range() -> None:
    cfg = CopyEditConfig(min_scale=0.5, max_scale=2.0)
    widths = [copy_edits.rescale(grey_image(40, 30), rng(seed), cfg).size[0] for seed in range(100)]
    assert min(widths) >= 20 and max(widths) <= 80
    assert min(widths) < 30 and max(widths) > 55  # both shrinking and growing happen
    tiny = copy_edits.rescale(grey_image(6, 6), rng(), CopyEditConfig(min_scale=0.1, max_scale=0.1))
    assert tiny.size == (copy_edits.MIN_SIDE, copy_edits.MIN_SIDE)


def test_jpeg_quality_bounds_how_much_the_pixels_change() -> None:
    image = rgb_image()
    low = copy_edits.jpeg(image, rng(), CopyEditConfig(jpeg_min_quality=50, jpeg_max_quality=50))
    high = copy_edits.jpeg(image, rng(), CopyEditConfig(jpeg_min_quality=95, jpeg_max_quality=95))
    error_low = np.abs(pixels(low) - pixels(image)).mean()
    error_high = np.abs(pixels(high) - pixels(image)).mean()
    assert 0 < error_high < error_low < 20


def test_color_factors_are_bounded_and_zero_strength_is_identity() -> None:
    image = rgb_image()
    none = CopyEditConfig(max_brightness=0.0, max_contrast=0.0, max_saturation=0.0)
    assert np.abs(pixels(copy_edits.color(image, rng(), none)) - pixels(image)).max() <= 1
    brightness_only = CopyEditConfig(max_brightness=0.3, max_contrast=0.0, max_saturation=0.0)
    for seed in range(20):
        ratio = pixels(copy_edits.color(image, rng(seed), brightness_only)).mean() / pixels(image).mean()
        assert 0.69 <= ratio <= 1.31


def test_rotation_is_small_and_zero_is_identity() -> None:
    image = grey_image()
    assert copy_edits.rotate(image, rng(), CopyEditConfig(max_rotation=0.0)).tobytes() == image.tobytes()
    small = copy_edits.rotate(image, rng(), CopyEditConfig(max_rotation=5.0))
    large = image.rotate(30, resample=Image.Resampling.BICUBIC)
    assert 0 < np.abs(pixels(small) - pixels(image)).mean() < np.abs(pixels(large) - pixels(image)).mean()


def test_flip_mirrors() -> None:
    image = rgb_image()
    flipped = copy_edits.flip(image, rng(), CopyEditConfig())
    assert np.array_equal(pixels(flipped), pixels(image)[:, ::-1])


def test_text_covers_some_pixels_but_not_the_image() -> None:
    image = rgb_image(64, 64)
    for seed in range(10):
        out = copy_edits.text(image, rng(seed), CopyEditConfig())
        changed = float((np.abs(pixels(out) - pixels(image)).sum(axis=-1) > 0).mean())
        assert 0.0 < changed < 0.5


def test_random_copy_draws_by_probability_never_nothing_and_in_order() -> None:
    only_crop = CopyEditConfig(probabilities={"crop": 1.0})
    assert random_copy(grey_image(), rng(), only_crop)[1] == ("crop",)
    cfg = CopyEditConfig()
    drawn = [random_copy(grey_image(), rng(seed), cfg)[1] for seed in range(400)]
    assert all(names for names in drawn)
    assert all(list(names) == sorted(names, key=EDIT_NAMES.index) for names in drawn)
    share_crop = np.mean(["crop" in names for names in drawn])
    share_flip = np.mean(["flip" in names for names in drawn])
    assert 0.4 < share_crop < 0.62 and 0.17 < share_flip < 0.35  # 0.5 and 0.25 (plus the never-empty rule)
    a, names_a = random_copy(rgb_image(), copy_edits.copy_rng(7, 3, 0), cfg)
    b, names_b = random_copy(rgb_image(), copy_edits.copy_rng(7, 3, 0), cfg)
    assert names_a == names_b and a.tobytes() == b.tobytes()


def test_config_rejects_impossible_strengths() -> None:
    CopyEditConfig().validate()
    for bad in (CopyEditConfig(max_crop=1.0), CopyEditConfig(min_scale=2.0, max_scale=1.0),
                CopyEditConfig(jpeg_min_quality=96, jpeg_max_quality=95), CopyEditConfig(max_rotation=90.0),
                CopyEditConfig(probabilities={"blur": 0.5}), CopyEditConfig(probabilities={"crop": 0.0})):
        with pytest.raises(ValueError):
            bad.validate()
