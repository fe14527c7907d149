"""Multi-crop augmentation of the DINOv2 recipe (DINOv2 §4; crops and photometric ops of DINO/BYOL).

Each image gives 2 global crops (``global_crops_size``, area scale ``global_crops_scale``) and
``local_crops_number`` local crops (``local_crops_size``, ``local_crops_scale``). Every crop gets a
random resized crop (bicubic) and a horizontal flip, then colour jitter, random grayscale, a
Gaussian blur, and (second global crop only) solarization, and finally ImageNet normalisation.
Defaults are the official ones (``dinov2/data/augmentations.py``, ``transforms.py``,
``ssl_default_config.yaml``); ``docs/augmentation.md`` lists every element and its parameter.

Choices made here, relative to the official code:

* **Blur probability.** The official ``GaussianBlur(p)`` hands ``1 - p`` to ``RandomApply``,
  whose argument is the probability of *applying*; so the official code blurs global crop 1 with
  probability 0 (not 1), global crop 2 with 0.9 (not 0.1) and local crops with 0.5 (see
  facebookresearch/dinov2 PR #411, dinov3 issue #286). ``blur_p_semantics="apply"`` (default)
  blurs with the probabilities as written (the paper's and BYOL's intent);
  ``"official_code"`` reproduces the released checkpoints' pipeline.
* **Blur kernel on small crops.** The official kernel is 9 px with sigma in [0.1, 2.0] px at any
  crop size. Here sigma stays in pixels and the kernel is clamped to the largest odd size that fits
  in the crop (``blur_kernel_for``); 9 fits 12 px and larger crops, so the 28/12 px CPU preset
  keeps it unchanged, and the blur is relatively ~8x stronger than at 224 px.
* **Grey inputs.** ``in_chans_mode="to_rgb"`` (default) converts single-channel (and RGBA/palette)
  images to 3-channel RGB before the pipeline, so the backbone always sees 3 channels;
  ``"require_rgb"`` raises instead. On a grey image saturation, hue and grayscale are no-ops.
* **Tensor inputs** are converted to uint8 ``(3, H, W)`` first, so every op (notably solarize's
  threshold 128) works on the same 0..255 scale as the official PIL path; float inputs in [0, 1]
  are quantised to 8 bits by that conversion.
* **torchvision.transforms.v2** instead of v1: same operations and parameters, but not the same
  random draws for a given torch seed, so crops are not bit-identical to the official ones.

Reproducibility: torchvision's transforms draw from torch's global CPU generator and take no
``Generator`` argument, so a call with ``generator_seed`` runs inside ``torch.random.fork_rng``
(CPU only) after seeding the CPU generator; the caller's generator state is restored on exit.
Cost: saving and restoring the ~5 KB Mersenne-Twister state, about 10 µs per call on this machine,
negligible next to the crops. The fork is process-global, so don't call this from several threads
of one process at once (DataLoader workers are processes, which is fine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypedDict

import PIL.Image
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

ImageInput = PIL.Image.Image | torch.Tensor

_INTERPOLATIONS = {
    "bicubic": v2.InterpolationMode.BICUBIC,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "nearest": v2.InterpolationMode.NEAREST,
}


@dataclass
class MultiCropConfig:
    """Parameters of ``DataAugmentationDINO``; defaults are the official DINOv2 values."""

    global_crops_size: int = 224
    local_crops_size: int = 96
    global_crops_scale: tuple[float, float] = (0.32, 1.0)
    local_crops_scale: tuple[float, float] = (0.05, 0.32)
    local_crops_number: int = 8
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    flip_p: float = 0.5
    color_jitter_p: float = 0.8
    color_jitter_brightness: float = 0.4
    color_jitter_contrast: float = 0.4
    color_jitter_saturation: float = 0.2
    color_jitter_hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p_global1: float = 1.0
    blur_p_global2: float = 0.1
    blur_p_local: float = 0.5
    blur_p_semantics: Literal["apply", "official_code"] = "apply"
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # pixels, whatever the crop size
    blur_kernel_size: int = 9  # clamped to the crop size, see blur_kernel_for
    solarize_threshold: float = 128.0  # on the 0..255 scale
    solarize_p_global2: float = 0.2
    normalize_mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    normalize_std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    in_chans_mode: Literal["to_rgb", "require_rgb"] = "to_rgb"

    def validate(self) -> None:
        for name in ("global_crops_size", "local_crops_size", "blur_kernel_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.blur_kernel_size % 2 == 0:
            raise ValueError(f"blur_kernel_size must be odd, got {self.blur_kernel_size}")
        if self.local_crops_number < 0:
            raise ValueError(f"local_crops_number must be >= 0, got {self.local_crops_number}")
        for name in ("global_crops_scale", "local_crops_scale"):
            _check_scale(name, getattr(self, name))
        for name in ("flip_p", "color_jitter_p", "grayscale_p", "blur_p_global1", "blur_p_global2",
                     "blur_p_local", "solarize_p_global2"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("color_jitter_brightness", "color_jitter_contrast", "color_jitter_saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.color_jitter_hue <= 0.5:
            raise ValueError(f"color_jitter_hue must be in [0, 0.5], got {self.color_jitter_hue}")
        if len(self.blur_sigma) != 2 or not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be (min, max) with 0 < min <= max, got {self.blur_sigma}")
        if not 0.0 <= self.solarize_threshold <= 255.0:
            raise ValueError(f"solarize_threshold must be in [0, 255], got {self.solarize_threshold}")
        if len(self.normalize_mean) != 3 or len(self.normalize_std) != 3 or min(self.normalize_std) <= 0:
            raise ValueError("normalize_mean and normalize_std need 3 values each, std > 0")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.blur_p_semantics not in ("apply", "official_code"):
            raise ValueError(f"blur_p_semantics must be 'apply' or 'official_code', got {self.blur_p_semantics!r}")
        if self.in_chans_mode not in ("to_rgb", "require_rgb"):
            raise ValueError(f"in_chans_mode must be 'to_rgb' or 'require_rgb', got {self.in_chans_mode!r}")


def _check_scale(name: str, scale: tuple[float, float]) -> None:
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max <= 1, got {scale}")


def fashion_mnist_config(local_crops_size: int = 12) -> MultiCropConfig:
    """The CPU preset for 28×28 Fashion-MNIST: 28 px global crops, small local crops, rest official.

    12 px local crops divide into patch 4 (3×3 tokens) and 14 px into patch 7 or 2.
    """
    return MultiCropConfig(global_crops_size=28, local_crops_size=local_crops_size)


class MultiCropOutput(TypedDict):
    global_crops: list[torch.Tensor]  # 2 × (3, G, G) float32, normalised
    global_crops_teacher: list[torch.Tensor]  # the same two tensors, as in the official code
    local_crops: list[torch.Tensor]  # local_crops_number × (3, L, L) float32, normalised
    offsets: tuple[()]


def blur_kernel_for(crop_size: int, kernel_size: int) -> int:
    """The largest odd kernel no bigger than ``kernel_size`` that fits in a ``crop_size`` crop.

    The official 9 px kernel is kept for crops of 9 px and more (all of the 224/96 and 28/12
    presets); smaller crops get the largest odd size that fits, e.g. 7 for an 8 px crop.
    """
    largest_odd_fitting = crop_size if crop_size % 2 == 1 else crop_size - 1
    return max(1, min(kernel_size, largest_odd_fitting))


def to_rgb_input(image: ImageInput, in_chans_mode: str) -> PIL.Image.Image | tv_tensors.Image:
    """A 3-channel RGB PIL image, or a uint8 ``(3, H, W)`` image tensor, from the caller's image."""
    if isinstance(image, PIL.Image.Image):
        if image.mode == "RGB":
            return image
        if in_chans_mode == "require_rgb":
            raise ValueError(f"in_chans_mode='require_rgb' but the image mode is {image.mode!r}")
        return image.convert("RGB")  # grey is replicated to 3 channels; alpha is dropped
    tensor = image.unsqueeze(0) if image.ndim == 2 else image  # (C, H, W)
    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3):
        raise ValueError(f"expected an image tensor (H, W), (1, H, W) or (3, H, W), got {tuple(image.shape)}")
    if tensor.shape[0] == 1:
        if in_chans_mode == "require_rgb":
            raise ValueError("in_chans_mode='require_rgb' but the image tensor has 1 channel")
        tensor = tensor.expand(3, -1, -1)
    # uint8 so solarize's threshold and the colour ops see the 0..255 scale of the PIL path.
    return tv_tensors.Image(v2.functional.to_dtype(tensor, torch.uint8, scale=True).contiguous())


class DataAugmentationDINO:
    """DINOv2 multi-crop: 2 global + ``local_crops_number`` local normalised crops per image."""

    def __init__(self, config: MultiCropConfig) -> None:
        config.validate()
        self.config = config
        self.global_geometry = self._geometry(config.global_crops_size, config.global_crops_scale)
        self.local_geometry = self._geometry(config.local_crops_size, config.local_crops_scale)
        colour = [
            v2.RandomApply(
                [v2.ColorJitter(
                    brightness=config.color_jitter_brightness,
                    contrast=config.color_jitter_contrast,
                    saturation=config.color_jitter_saturation,
                    hue=config.color_jitter_hue,
                )],
                p=config.color_jitter_p,
            ),
            v2.RandomGrayscale(p=config.grayscale_p),
        ]
        to_normalised = [
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(config.normalize_mean), std=list(config.normalize_std)),
        ]
        self.global1_photometric = v2.Compose(
            [*colour, self._blur(config.blur_p_global1, config.global_crops_size), *to_normalised]
        )
        self.global2_photometric = v2.Compose([
            *colour,
            self._blur(config.blur_p_global2, config.global_crops_size),
            v2.RandomSolarize(threshold=config.solarize_threshold, p=config.solarize_p_global2),
            *to_normalised,
        ])
        self.local_photometric = v2.Compose(
            [*colour, self._blur(config.blur_p_local, config.local_crops_size), *to_normalised]
        )

    def _geometry(self, size: int, scale: tuple[float, float]) -> v2.Compose:
        return v2.Compose([
            v2.RandomResizedCrop(
                size, scale=scale, interpolation=_INTERPOLATIONS[self.config.interpolation], antialias=True
            ),
            v2.RandomHorizontalFlip(p=self.config.flip_p),
        ])

    def _blur(self, p: float, crop_size: int) -> v2.RandomApply:
        # "official_code" reproduces the official RandomApply(p=1 - p) (see the module docstring).
        apply_p = p if self.config.blur_p_semantics == "apply" else 1.0 - p
        kernel = blur_kernel_for(crop_size, self.config.blur_kernel_size)
        return v2.RandomApply([v2.GaussianBlur(kernel_size=kernel, sigma=self.config.blur_sigma)], p=apply_p)

    def __call__(self, image: ImageInput, generator_seed: int | None = None) -> MultiCropOutput:
        """Crops of ``image``; with ``generator_seed`` the same (image, seed) always gives the same crops."""
        if generator_seed is None:
            return self._crops(image)
        # torchvision draws from the global CPU generator: seed a fork of it, restored on exit.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(generator_seed)
            return self._crops(image)

    def _crops(self, image: ImageInput) -> MultiCropOutput:
        rgb = to_rgb_input(image, self.config.in_chans_mode)
        global1 = _plain(self.global1_photometric(self.global_geometry(rgb)))  # (3, G, G)
        global2 = _plain(self.global2_photometric(self.global_geometry(rgb)))  # (3, G, G)
        local_crops = [
            _plain(self.local_photometric(self.local_geometry(rgb)))  # (3, L, L)
            for _ in range(self.config.local_crops_number)
        ]
        return {
            "global_crops": [global1, global2],
            "global_crops_teacher": [global1, global2],
            "local_crops": local_crops,
            "offsets": (),
        }


def _plain(image: torch.Tensor) -> torch.Tensor:
    """A plain tensor (not a tv_tensors.Image), so downstream torch ops never see the subclass."""
    return image.as_subclass(torch.Tensor)
