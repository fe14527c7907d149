"""Images -> embeddings with a backbone bundle: resize, normalise, forward, pool.

The embedding is the final-norm CLS token (B, D); with ``avgpool`` the mean of the final-norm patch
tokens is appended (B, 2D), the feature the DINOv2 linear evaluation concatenates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from components.models.export import BackboneBundle


@dataclass(frozen=True)
class EmbedOptions:
    image_size: int | None = None  # None: the backbone's img_size (its native grid)
    avgpool: bool = False  # append the mean patch token to the CLS token
    batch_size: int = 32
    device: str = "cpu"

    def validate(self) -> None:
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> EmbedOptions:
        values = dict(values or {})
        unknown = sorted(set(values) - {"image_size", "avgpool", "batch_size", "device"})
        if unknown:
            raise ValueError(f"unknown embedding options {unknown}")
        options = cls(**values)
        options.validate()
        return options


def preprocess(image: np.ndarray, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(H, W, 3) float in [0, 1] -> (3, size, size) normalised; bicubic with antialiasing when resizing."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]  # (1, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x - mean_t) / std_t)[0]  # (3, size, size)


def patch_multiple(size: int, patch: int) -> int:
    """The nearest multiple of the patch size (at least one patch): the model refuses other sizes."""
    return max(patch, round(size / patch) * patch)


def required(tensor: torch.Tensor | None) -> torch.Tensor:
    if tensor is None:  # forward_features always fills the CLS and patch tokens; this is for mypy's sake
        raise RuntimeError("backbone returned no tokens")
    return tensor


@torch.no_grad()
def embed_images(bundle: BackboneBundle, images: Sequence[np.ndarray], options: EmbedOptions) -> np.ndarray:
    """(B, D) or, with ``avgpool``, (B, 2D) float32 embeddings of ``images`` ((H, W, 3) in [0, 1])."""
    size = patch_multiple(options.image_size or bundle.config.img_size, bundle.config.patch_size)
    model = bundle.model.to(options.device).eval()
    out = []
    for start in range(0, len(images), options.batch_size):
        chunk = images[start:start + options.batch_size]
        x = torch.stack([preprocess(im, size, bundle.mean, bundle.std) for im in chunk]).to(options.device)
        features = model.forward_features(x)
        parts = [required(features["x_norm_clstoken"])]  # (b, D)
        if options.avgpool:
            parts.append(required(features["x_norm_patchtokens"]).mean(dim=1))  # (b, D)
        out.append(torch.cat(parts, dim=-1).float().cpu())
    if not out:
        return np.zeros((0, bundle.model.embed_dim * (2 if options.avgpool else 1)), dtype=np.float32)
    return torch.cat(out).numpy()
