"""Multi-crop augmentation of a whole batch at once, on tensors (the fast path for small images on CPU).

The per-sample path (:mod:`components.data.multicrop`) runs about 60 torchvision calls per image; for
28 px images that costs more than the model's training step (measured 9.4 ms an image against about
6 ms, docs/augmentation.md). This module draws the same distributions for every crop but applies
each operation to all crops of a batch in one call:

* **geometry**: the official ``RandomResizedCrop`` box (area in ``scale``, log-uniform aspect ratio in
  [3/4, 4/3], 10 tries then the centre fallback, integer boxes) and the horizontal flip, sampled in
  one ``torchvision.ops.roi_align`` call per crop size. ``roi_align`` is bilinear and averages
  ``ceil(box / output)`` samples per output pixel, so shrinking is anti-aliased like the per-sample
  path's ``antialias=True``; the per-sample path interpolates bicubically (a small difference in
  sharpness, measured in the statistical test);
* **colour jitter** with the four factors of ``ColorJitter`` and a random order of the four ops per
  crop (as torchvision draws one per call), **grayscale**, **Gaussian blur** (per-crop sigma, the same
  clamped kernel, reflect padding), **solarize** (second global crop), then normalisation;
* the photometric ops run in float32 on the 0..1 scale; the per-sample path rounds to uint8 after
  each op. Solarize's threshold 128 (of 255) is applied as ``x >= 128 / 255``.

Randomness is counter-based: every draw is a hash of (seed, sample key, crop, draw), so a sample's
crops depend only on its key (the engine passes the stream position's seed, ``seed_for``), never
on which batch, rank or world size it lands in. A resumed or re-sharded run gets identical crops.

Input: a batch of uint8 images ``(B, 3, H, W)`` with each image's true size (smaller images padded
at the bottom/right by repeating their last row/column, see :func:`pad_to_canvas`), so pools of
mixed sizes batch too; boxes never leave an image's own area.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from components.data.multicrop import MultiCropConfig, blur_kernel_for

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
RESIZED_CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params
N_JITTER_ORDERS = 24  # permutations of (brightness, contrast, saturation, hue)

# Draw slots per crop: each random quantity of a crop reads its own slot of the counter-based stream.
_SLOT_CROP = 0  # 4 per try: area, log ratio, top, left -> 0..39
_SLOT_FLIP = 40
_SLOT_JITTER_APPLY = 41
_SLOT_JITTER_FACTORS = 42  # 4: brightness, contrast, saturation, hue
_SLOT_JITTER_ORDER = 46
_SLOT_GRAY = 47
_SLOT_BLUR_APPLY = 48
_SLOT_BLUR_SIGMA = 49
_SLOT_SOLARIZE = 50
SLOTS_PER_CROP = 64

_PERMUTATIONS = torch.tensor([
    (a, b, c, d) for a in range(4) for b in range(4) for c in range(4) for d in range(4)
    if len({a, b, c, d}) == 4
])  # (24, 4): torchvision's ColorJitter draws torch.randperm(4) per call


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser on uint64 arrays (wrap-around arithmetic is intended)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def counter_uniforms(seed: int, keys: Sequence[int] | np.ndarray, crop: int, n_slots: int = SLOTS_PER_CROP
                     ) -> Tensor:
    """Uniforms in [0, 1) of shape ``(len(keys), n_slots)``, a pure function of (seed, key, crop, slot)."""
    key_arr = np.asarray(keys, dtype=np.int64).astype(np.uint64)[:, None]  # (N, 1)
    slots = np.arange(n_slots, dtype=np.uint64)[None, :]  # (1, S)
    with np.errstate(over="ignore"):
        mixed = _splitmix64(np.array(seed & 0xFFFFFFFFFFFFFFFF, dtype=np.uint64) ^ np.uint64(0x5EED))
        mixed = _splitmix64(mixed ^ key_arr)
        mixed = _splitmix64(mixed ^ (np.uint64(crop) * np.uint64(0xD1B54A32D192ED03)))
        mixed = _splitmix64(mixed ^ slots)  # (N, S)
    return torch.from_numpy((mixed >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def resized_crop_boxes(u: Tensor, heights: Tensor, widths: Tensor, scale: tuple[float, float],
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """``RandomResizedCrop.get_params`` for N crops at once: boxes ``(N, 4)`` as (x1, y1, x2, y2) pixels.

    ``u``: (N, >= 40) uniforms (slots 0..39, four per try). Like torchvision: up to 10 tries of an area
    and a log-uniform ratio, rounded sizes, the first box that fits wins; else a centre crop with the
    ratio clamped to ``ratio``.
    """
    h_img, w_img = heights.double(), widths.double()  # (N,)
    area = h_img * w_img
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    tries = u[:, : 4 * RESIZED_CROP_TRIES].reshape(-1, RESIZED_CROP_TRIES, 4)  # (N, T, 4)
    target_area = area[:, None] * (scale[0] + (scale[1] - scale[0]) * tries[..., 0])  # (N, T)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    fits = (w > 0) & (h > 0) & (w <= w_img[:, None]) & (h <= h_img[:, None])  # (N, T)
    # randint(0, H - h + 1) == floor(u * (H - h + 1))
    top = torch.floor(tries[..., 2] * (h_img[:, None] - h + 1))
    left = torch.floor(tries[..., 3] * (w_img[:, None] - w + 1))
    first = torch.argmax(fits.int(), dim=1)  # (N,) first fitting try (0 when none fits)
    any_fit = fits.any(dim=1)
    pick = first[:, None]
    w_sel, h_sel = w.gather(1, pick)[:, 0], h.gather(1, pick)[:, 0]
    top_sel, left_sel = top.gather(1, pick)[:, 0], left.gather(1, pick)[:, 0]
    # Fallback: whole image, centre crop at the clamped ratio.
    in_ratio = w_img / h_img
    fb_w = torch.where(in_ratio < ratio[0], w_img, torch.where(in_ratio > ratio[1], torch.round(h_img * ratio[1]),
                                                                 w_img))
    fb_h = torch.where(in_ratio < ratio[0], torch.round(w_img / ratio[0]), h_img)
    fb_top = torch.floor((h_img - fb_h) / 2)  # torchvision: (height - h) // 2
    fb_left = torch.floor((w_img - fb_w) / 2)
    w_sel, h_sel = torch.where(any_fit, w_sel, fb_w), torch.where(any_fit, h_sel, fb_h)
    top_sel, left_sel = torch.where(any_fit, top_sel, fb_top), torch.where(any_fit, left_sel, fb_left)
    return torch.stack([left_sel, top_sel, left_sel + w_sel, top_sel + h_sel], dim=1).float()  # (N, 4)


def pad_to_canvas(images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """uint8 ``(3, h_i, w_i)`` images -> one ``(B, 3, H, W)`` canvas (edge-replicated) and sizes ``(B, 2)``."""
    heights = [int(image.shape[-2]) for image in images]
    widths = [int(image.shape[-1]) for image in images]
    height, width = max(heights), max(widths)
    if all(h == height for h in heights) and all(w == width for w in widths):
        canvas = torch.stack(list(images))
    else:
        # Replicate padding: bilinear samples half a pixel past an image's edge then see its own edge.
        canvas = torch.stack([
            F.pad(image[None].float(), (0, width - image.shape[-1], 0, height - image.shape[-2]),
                  mode="replicate")[0].to(torch.uint8)
            for image in images
        ])
    return canvas, torch.tensor(list(zip(heights, widths, strict=True)), dtype=torch.long)


def _blend(a: Tensor, b: Tensor, factor: Tensor) -> Tensor:
    """torchvision's _blend: ``factor * a + (1 - factor) * b`` clamped to [0, 1]; factor (N,)."""
    f = factor.view(-1, 1, 1, 1).to(a.dtype)
    return (f * a + (1 - f) * b).clamp_(0, 1)


def grayscale(x: Tensor) -> Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma with torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)  # (N, 1, 1, 1)
    return _blend(x, mean, factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue by ``shift`` (N,) turns, in HSV, as torchvision's adjust_hue on float images."""
    r, g, b = x.unbind(dim=1)  # (N, H, W) each
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    hue = (hue + shift.view(-1, 1, 1).to(x.dtype)) % 1.0
    # HSV -> RGB
    i = torch.floor(hue * 6.0)
    f = hue * 6.0 - i
    i = i.long() % 6
    v = maxc
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    choices = torch.stack([
        torch.stack([v, q, p, p, t, v], dim=1),
        torch.stack([t, v, v, q, p, p], dim=1),
        torch.stack([p, p, t, v, v, q], dim=1),
    ], dim=1)  # (N, 3, 6, H, W)
    index = i[:, None, None].expand(-1, 3, 1, -1, -1)
    return choices.gather(2, index).squeeze(2).clamp_(0, 1)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur, one sigma per image (N,), reflect padding (torchvision's gaussian_blur)."""
    if kernel_size <= 1:
        return x
    n, c, h, w = x.shape
    half = (kernel_size - 1) * 0.5
    grid = torch.linspace(-half, half, kernel_size, dtype=x.dtype)  # (k,)
    kernel = torch.exp(-0.5 * (grid[None] / sigma.to(x.dtype)[:, None]) ** 2)  # (N, k)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    weight = kernel.repeat_interleave(c, dim=0)  # (N*C, k)
    pad = kernel_size // 2
    flat = x.reshape(1, n * c, h, w)
    flat = F.pad(flat, (pad, pad, pad, pad), mode="reflect")
    flat = F.conv2d(flat, weight[:, None, None, :], groups=n * c)  # horizontal
    flat = F.conv2d(flat, weight[:, None, :, None], groups=n * c)  # vertical
    return flat.reshape(n, c, h, w)


class BatchedMultiCrop:
    """DINOv2 multi-crop for a batch: 2 global + ``local_crops_number`` local crops of every image.

    Returns ``(global_crops (2B, 3, G, G), local_crops (n_local * B, 3, L, L))`` in the official crop-major
    order (all images' first crop, then all images' second crop, ...), normalised float32.
    """

    def __init__(self, config: MultiCropConfig, seed: int = 0) -> None:
        config.validate()
        self.config = config
        self.seed = seed
        self.mean = torch.tensor(config.normalize_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(config.normalize_std, dtype=torch.float32).view(1, 3, 1, 1)

    def blur_apply_p(self, p: float) -> float:
        return p if self.config.blur_p_semantics == "apply" else 1.0 - p

    def __call__(self, canvas: Tensor, sizes: Tensor, keys: Sequence[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        c = self.config
        if canvas.ndim != 4 or canvas.shape[1] != 3 or canvas.dtype != torch.uint8:
            raise ValueError(f"canvas must be uint8 (B, 3, H, W), got {canvas.dtype} {tuple(canvas.shape)}")
        images = canvas.float().div_(255.0)  # (B, 3, H, W)
        g1 = self._crop(images, sizes, keys, 0, c.global_crops_size, c.global_crops_scale, c.blur_p_global1, 0.0)
        g2 = self._crop(images, sizes, keys, 1, c.global_crops_size, c.global_crops_scale, c.blur_p_global2,
                        c.solarize_p_global2)
        locals_ = [
            self._crop(images, sizes, keys, 2 + i, c.local_crops_size, c.local_crops_scale, c.blur_p_local, 0.0)
            for i in range(c.local_crops_number)
        ]
        global_crops = torch.cat([g1, g2])  # (2B, 3, G, G)
        local_crops = torch.cat(locals_) if locals_ else torch.empty(0)  # (n_local * B, 3, L, L)
        return global_crops, local_crops

    def _crop(self, images: Tensor, sizes: Tensor, keys: Sequence[int] | np.ndarray, crop: int, size: int,
              scale: tuple[float, float], blur_p: float, solarize_p: float) -> Tensor:
        c = self.config
        u = counter_uniforms(self.seed, keys, crop)  # (B, S) float64
        boxes = resized_crop_boxes(u, sizes[:, 0], sizes[:, 1], scale)  # (B, 4)
        rois = torch.cat([torch.arange(len(boxes), dtype=torch.float32)[:, None], boxes], dim=1)  # (B, 5)
        # aligned=True: pixel centres at +0.5, so box (0, 0, W, H) samples exactly the image's pixels.
        x = roi_align(images, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        flip = u[:, _SLOT_FLIP] < c.flip_p
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)  # (B, 3, size, size)
        x = self._jitter(x, u)
        gray = u[:, _SLOT_GRAY] < c.grayscale_p
        x = torch.where(gray.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
        blur = u[:, _SLOT_BLUR_APPLY] < self.blur_apply_p(blur_p)
        if bool(blur.any()):
            lo, hi = c.blur_sigma
            sigma = (lo + (hi - lo) * u[:, _SLOT_BLUR_SIGMA]).float()
            kernel = blur_kernel_for(size, c.blur_kernel_size)
            x = x.clone()
            x[blur] = gaussian_blur(x[blur], sigma[blur], kernel)
        if solarize_p > 0:
            solarize = (u[:, _SLOT_SOLARIZE] < solarize_p).view(-1, 1, 1, 1)
            bound = c.solarize_threshold / 255.0
            x = torch.where(solarize & (x >= bound), 1.0 - x, x)
        return (x - self.mean) / self.std

    def _jitter(self, x: Tensor, u: Tensor) -> Tensor:
        c = self.config
        apply = u[:, _SLOT_JITTER_APPLY] < c.color_jitter_p  # (B,)
        if not bool(apply.any()):
            return x
        f = u[:, _SLOT_JITTER_FACTORS:_SLOT_JITTER_FACTORS + 4].float()  # (B, 4)
        factors = [
            _factor(f[:, 0], c.color_jitter_brightness),
            _factor(f[:, 1], c.color_jitter_contrast),
            _factor(f[:, 2], c.color_jitter_saturation),
            (f[:, 3] * 2 - 1) * c.color_jitter_hue,  # hue shift in [-hue, hue]
        ]
        enabled = [c.color_jitter_brightness > 0, c.color_jitter_contrast > 0, c.color_jitter_saturation > 0,
                   c.color_jitter_hue > 0]
        ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
        order = _PERMUTATIONS[(u[:, _SLOT_JITTER_ORDER] * N_JITTER_ORDERS).long().clamp_(max=N_JITTER_ORDERS - 1)]
        # Saturation and hue leave a grey crop grey (hue exactly; saturation up to the 1e-4 by which the luma
        # weights miss 1), and brightness/contrast keep it grey: skip them there (half the cost on grey pools).
        grey = ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(dim=1)  # (B,)
        x = x.clone()
        for position in range(4):
            for op_index, op in enumerate(ops):
                if not enabled[op_index]:
                    continue
                rows = apply & (order[:, position] == op_index)
                if op_index >= 2:
                    rows = rows & ~grey
                if bool(rows.any()):
                    x[rows] = op(x[rows], factors[op_index][rows])
        return x


def _factor(u: Tensor, strength: float) -> Tensor:
    """ColorJitter's factor range [max(0, 1 - s), 1 + s] from uniforms."""
    low = max(0.0, 1.0 - strength)
    return low + (1.0 + strength - low) * u


class RawSample(NamedTuple):
    """A decoded image as uint8 ``(3, H, W)`` and the key its crops are drawn from (``seed_for``)."""

    image: Tensor
    key: int


class BatchedCrops(NamedTuple):
    """The crops of one batch, stacked crop-major; what the per-sample path's stacking produces."""

    global_crops: Tensor  # (2B, 3, G, G)
    local_crops: Tensor  # (n_local * B, 3, L, L)


def raw_sample(image: PIL.Image.Image, key: int) -> RawSample:
    """The dataset transform of the batched path: only decode to a uint8 RGB tensor (crops come per batch)."""
    array = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    return RawSample(torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous(), key)


class BatchAugmenter:
    """A DataLoader ``collate_fn`` (picklable) for the batched path: raw samples -> :class:`BatchedCrops`.

    Runs in the loader's worker processes when ``num_workers > 0``, so augmentation overlaps the step.
    """

    def __init__(self, config: MultiCropConfig) -> None:
        self.augment = BatchedMultiCrop(config)

    def __call__(self, samples: list[RawSample]) -> BatchedCrops:
        canvas, sizes = pad_to_canvas([sample.image for sample in samples])
        global_crops, local_crops = self.augment(canvas, sizes, [sample.key for sample in samples])
        return BatchedCrops(global_crops, local_crops)
