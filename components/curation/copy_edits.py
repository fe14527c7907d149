"""The edits a copy of an image goes through on its way back into a crawl, as seeded PIL functions.

A near-duplicate in a web pool is rarely a byte copy: somebody cropped it a little, rescaled it,
re-encoded it as JPEG, pushed the brightness, rotated it by a few degrees, mirrored it or wrote a
caption on it. Threshold calibration (calibrate.py) and the copy-detection benchmark
(benchmarks/copy_detection.py) plant such copies of known images and measure whether the descriptor
still recognises them. Every edit here takes the image and a ``numpy.random.Generator`` and draws its
own strength within the limits of :class:`CopyEditConfig`, so the same seed gives the same copy.

:func:`random_copy` composes them: each edit is applied independently with its probability
(``CopyEditConfig.probabilities``, defaults in :data:`DEFAULT_PROBABILITIES`), in the order a copy
meets them (geometry, then colour, then the caption, then rescaling, JPEG last because re-encoding
is what the last uploader does); when no edit was drawn one is picked uniformly, so every copy is
edited.
"""

from __future__ import annotations

import io
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont, ImageOps

# In the order random_copy applies them (see the module docstring for why).
EDIT_NAMES = ("crop", "rotate", "flip", "color", "text", "rescale", "jpeg")
# Chance of each edit in random_copy: a copy typically goes through two or three of them.
DEFAULT_PROBABILITIES: dict[str, float] = {"crop": 0.5, "rotate": 0.25, "flip": 0.25, "color": 0.5,
                                           "text": 0.25, "rescale": 0.5, "jpeg": 0.5}
MIN_SIDE = 4  # px: a rescaled copy keeps at least this many pixels per side
TEXT_ALPHABET = string.ascii_letters + string.digits


@dataclass
class CopyEditConfig:
    """The strongest edit of each kind a planted copy may receive (each copy draws below these)."""

    max_crop: float = 0.2  # at most this fraction of each side is cut off (split between its two ends)
    min_scale: float = 0.5  # rescaling factor of both sides, drawn log-uniformly in [min_scale, max_scale]
    max_scale: float = 2.0
    jpeg_min_quality: int = 50  # JPEG re-encode quality drawn in [jpeg_min_quality, jpeg_max_quality]
    jpeg_max_quality: int = 95
    max_brightness: float = 0.3  # brightness factor in [1 - b, 1 + b]
    max_contrast: float = 0.3  # contrast factor in [1 - c, 1 + c]
    max_saturation: float = 0.3  # saturation factor in [1 - s, 1 + s] (no effect on grey images)
    max_rotation: float = 5.0  # degrees, either direction
    max_text_chars: int = 6  # overlaid caption of 1..max_text_chars letters and digits
    text_height: float = 0.2  # caption font size as a fraction of the image height (at least 6 px)
    probabilities: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_PROBABILITIES))

    def validate(self) -> None:
        if not 0.0 <= self.max_crop < 1.0:
            raise ValueError("copy edits: max_crop must be in [0, 1)")
        if not 0.0 < self.min_scale <= self.max_scale:
            raise ValueError("copy edits: need 0 < min_scale <= max_scale")
        if not 1 <= self.jpeg_min_quality <= self.jpeg_max_quality <= 100:
            raise ValueError("copy edits: need 1 <= jpeg_min_quality <= jpeg_max_quality <= 100")
        if not all(0.0 <= s < 1.0 for s in (self.max_brightness, self.max_contrast, self.max_saturation)):
            raise ValueError("copy edits: max_brightness, max_contrast and max_saturation must be in [0, 1)")
        if not 0.0 <= self.max_rotation <= 45.0:
            raise ValueError("copy edits: max_rotation must be in [0, 45] degrees")
        if self.max_text_chars < 1 or not 0.0 < self.text_height <= 1.0:
            raise ValueError("copy edits: max_text_chars must be >= 1 and text_height in (0, 1]")
        unknown = set(self.probabilities) - set(EDIT_NAMES)
        if unknown:
            raise ValueError(f"copy edits: unknown edits {sorted(unknown)} in probabilities; known: {EDIT_NAMES}")
        if not all(0.0 <= p <= 1.0 for p in self.probabilities.values()):
            raise ValueError("copy edits: probabilities must be in [0, 1]")
        if not any(p > 0 for p in self.probabilities.values()):
            raise ValueError("copy edits: at least one edit needs a probability above 0")


Edit = Callable[[Image.Image, np.random.Generator, CopyEditConfig], Image.Image]


def crop_box(size: tuple[int, int], rng: np.random.Generator, max_crop: float) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) keeping at least ``1 - max_crop`` of each side; the cut is split at random."""
    width, height = size
    cut_w = int(rng.integers(0, int(max_crop * width) + 1))  # px removed from the width, both ends together
    cut_h = int(rng.integers(0, int(max_crop * height) + 1))
    left = int(rng.integers(0, cut_w + 1))
    top = int(rng.integers(0, cut_h + 1))
    return left, top, left + width - cut_w, top + height - cut_h


def crop(image: Image.Image, rng: np.random.Generator, cfg: CopyEditConfig) -> Image.Image:
    """Cut at most ``max_crop`` of the width and of the height, then resize back to the original size."""
    box = crop_box(image.size, rng, cfg.max_crop)
    return image.crop(box).resize(image.size, Image.Resampling.BICUBIC)


def rescale(image: Image.Image, rng: np.random.Generator, cfg: CopyEditConfig) -> Image.Image:
    """Both sides times one factor in [min_scale, max_scale] (log-uniform: halving is as likely as doubling)."""
    factor = float(np.exp(rng.uniform(np.log(cfg.min_scale), np.log(cfg.max_scale))))
    width, height = image.size
    size = (max(MIN_SIDE, round(width * factor)), max(MIN_SIDE, round(height * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)


def jpeg(image: Image.Image, rng: np.random.Generator, cfg: CopyEditConfig) -> Image.Image:
    """Re-encoded as JPEG at a quality in [jpeg_min_quality, jpeg_max_quality] and decoded again."""
    quality = int(rng.integers(cfg.jpeg_min_quality, cfg.jpeg_max_quality + 1))
    buffer = io.BytesIO()
    encodable(image).save(buffer, format="JPEG", quality=quality)
    with Image.open(io.BytesIO(buffer.getvalue())) as decoded:
        return decoded.convert(encodable(image).mode)


def color(image: Image.Image, rng: np.random.Generator, cfg: CopyEditConfig) -> Image.Image:
    """Brightness, contrast and saturation each scaled by a factor drawn around 1."""
    out = encodable(image)
    for enhancer, strength in ((ImageEnhance.Brightness, cfg.max_brightness),
                               (ImageEnhance.Contrast, cfg.max_contrast),
                               (ImageEnhance.Color, cfg.max_saturation)):
        out = enhancer(out).enhance(float(rng.uniform(1.0 - strength, 1.0 + strength)))
    return out


def rotate(image: Image.Image, rng: np.random.Generator, cfg: CopyEditConfig) -> Image.Image:
    """A small rotation about the centre, same size; the uncovered corners take the border's median colour."""
    angle = float(rng.uniform(-cfg.max_rotation, cfg.max_rotation))
    out = encodable(image)
    return out.rotate(angle, resample=Image.Resampling.BICUBIC, expand=False, fillcolor=border_colour(out))


def flip(image: Image.Image, rng: np.random.Generator, cfg: CopyEditConfig) -> Image.Image:
    """The mirror image (left <-> right). Draws nothing, but keeps the signature of the other edits."""
    return ImageOps.mirror(image)


def text(image: Image.Image, rng: np.random.Generator, cfg: CopyEditConfig) -> Image.Image:
    """A short random caption (letters and digits) in a random colour at a random place, Pillow's default font."""
    out = encodable(image).copy()
    n_chars = int(rng.integers(1, cfg.max_text_chars + 1))
    caption = "".join(TEXT_ALPHABET[int(i)] for i in rng.integers(0, len(TEXT_ALPHABET), size=n_chars))
    font = ImageFont.load_default(size=max(6, round(cfg.text_height * out.height)))
    draw = ImageDraw.Draw(out)
    left, top, right, bottom = (int(v) for v in draw.textbbox((0, 0), caption, font=font))
    # Anywhere the caption's top-left corner keeps some of it inside the image (long captions may run off).
    x = int(rng.integers(-left, max(-left + 1, out.width - (right - left) // 2)))
    y = int(rng.integers(-top, max(-top + 1, out.height - (bottom - top))))
    rgb = tuple(int(v) for v in rng.integers(0, 256, size=3))
    fill: int | tuple[int, ...] = rgb if out.mode == "RGB" else int(rng.integers(0, 256))
    draw.text((x, y), caption, fill=fill, font=font)
    return out


EDITS: dict[str, Edit] = {"crop": crop, "rotate": rotate, "flip": flip, "color": color, "text": text,
                          "rescale": rescale, "jpeg": jpeg}


def apply_edits(image: Image.Image, names: tuple[str, ...], rng: np.random.Generator,
                cfg: CopyEditConfig) -> Image.Image:
    """``image`` through the named edits, in the order given."""
    out = image
    for name in names:
        out = EDITS[name](out, rng, cfg)
    return out


def draw_edits(rng: np.random.Generator, probabilities: Mapping[str, float]) -> tuple[str, ...]:
    """Which edits a copy gets: each independently with its probability, in EDIT_NAMES order, never none."""
    chosen = tuple(name for name in EDIT_NAMES if rng.random() < probabilities.get(name, 0.0))
    if chosen:
        return chosen
    possible = [name for name in EDIT_NAMES if probabilities.get(name, 0.0) > 0]
    return (possible[int(rng.integers(0, len(possible)))],)


def random_copy(image: Image.Image, rng: np.random.Generator,
                cfg: CopyEditConfig | None = None) -> tuple[Image.Image, tuple[str, ...]]:
    """A planted copy of ``image`` and the names of the edits it went through."""
    config = cfg or CopyEditConfig()
    names = draw_edits(rng, config.probabilities)
    return apply_edits(image, names, rng, config), names


def encodable(image: Image.Image) -> Image.Image:
    """The image as grey (``L``) or ``RGB``: the modes every edit (JPEG, enhancers, fills) handles."""
    return image if image.mode in ("L", "RGB") else image.convert("RGB")


def border_colour(image: Image.Image) -> int | tuple[int, ...]:
    """The median colour of the outermost pixels: what surrounds the subject, used to fill new corners."""
    pixels = np.asarray(image)  # (H, W) or (H, W, 3)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])  # (2W + 2H,) or (.., 3)
    median = np.median(border, axis=0)
    return int(median) if median.ndim == 0 else tuple(int(v) for v in median)


def copy_rng(seed: int, index: int, copy: int = 0) -> np.random.Generator:
    """The generator of planted copy ``copy`` of sampled image ``index``: independent of order and threads."""
    return np.random.default_rng([seed, index, copy])


__all__ = ["DEFAULT_PROBABILITIES", "EDITS", "EDIT_NAMES", "CopyEditConfig", "apply_edits", "color", "copy_rng",
           "crop", "crop_box", "draw_edits", "flip", "jpeg", "random_copy", "rescale", "rotate", "text"]
