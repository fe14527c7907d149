"""The DINOv2 PCA picture: principal components of patch features shown as colours next to the images.

As in DINOv2 (Fig. 1 and Sec. 7.5): a PCA of the patch features of all images together; the first
component, thresholded, separates foreground from background; a second PCA of the foreground patches
alone gives three components, each min-max scaled to [0, 1] and shown as R, G, B; background is black.

The sign of a principal component is arbitrary. The first one is oriented so that the patches on
the image border score lower on average than the inner ones (objects tend to be centred), then
foreground = score > ``threshold`` (0 = above the mean patch). Each of the three colour components
is oriented so its largest-magnitude loading is positive (scikit-learn's convention), so the colours
are reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from components.data.photos import load_photo
from components.evaluate.dense import dense_features
from components.evaluate.dense_data import rgb_tensor, save_png_atomic

PICTURE_NAME = "pca.png"


@dataclass
class PcaPictureConfig:
    enabled: bool = True
    photos: list[str] = field(default_factory=lambda: ["chelsea", "astronaut", "coffee", "rocket"])
    image_size: int = 28  # what the backbone sees (its patch grid is image_size / patch_size)
    threshold: float = 0.0  # on the first component (centred scores): above = foreground
    tile: int = 112  # pixels per picture cell

    def validate(self) -> None:
        if not self.photos:
            raise ValueError("photos must name at least one scikit-image photo")
        if self.image_size < 1 or self.tile < 1:
            raise ValueError("image_size and tile must be >= 1")


def principal_components(features: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """PCA of rows (M, D) in float64: scores (M, n) of the centred rows and components (n, D), each
    component signed so its largest-magnitude loading is positive."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need at least 2 rows of (M, D) features, got {x.shape}")
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)  # vt (min(M, D), D), by decreasing variance
    components = vt[:n]  # (n, D)
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    return centred @ components.T, components  # (M, n), (n, D)


def border_mask(h: int, w: int) -> np.ndarray:
    mask = np.zeros((h, w), dtype=bool)
    mask[[0, -1], :] = True
    mask[:, [0, -1]] = True
    return mask


def foreground_scores(patches: np.ndarray) -> np.ndarray:
    """First principal component of all patches (I, h, w, D) -> (I, h, w), oriented so the border
    patches score lower than the inner ones."""
    n_images, h, w, dim = patches.shape
    scores, _ = principal_components(patches.reshape(-1, dim), 1)
    scores = scores[:, 0].reshape(n_images, h, w)
    border = border_mask(h, w)
    if min(h, w) > 2 and scores[:, border].mean() > scores[:, ~border].mean():
        scores = -scores
    return scores


def pca_colours(patches: np.ndarray, threshold: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Patch features (I, h, w, D) -> colours (I, h, w, 3) in [0, 1] and the foreground mask (I, h, w).

    With fewer than 2 foreground patches every patch counts as foreground (no separation found)."""
    n_images, h, w, _ = patches.shape
    foreground = foreground_scores(patches) > threshold  # (I, h, w)
    if foreground.sum() < 2:
        foreground = np.ones_like(foreground)
    scores, _ = principal_components(patches[foreground], 3)  # (F, <=3)
    low, high = scores.min(axis=0), scores.max(axis=0)
    scaled = (scores - low) / np.where(high > low, high - low, 1.0)  # (F, <=3) in [0, 1]
    colours = np.zeros((n_images, h, w, 3), dtype=np.float64)
    colours[foreground, : scaled.shape[1]] = scaled
    return colours, foreground


def draw_pca_picture(images: np.ndarray, colours: np.ndarray, path: Path, tile: int = 112) -> Path:
    """One row per image: the image, then its PCA colours upsampled (nearest: one block per patch)."""
    canvas = Image.new("RGB", (2 * tile, len(images) * tile), (255, 255, 255))
    for row, (image, colour) in enumerate(zip(images, colours, strict=True)):
        canvas.paste(Image.fromarray(image).convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC),
                     (0, row * tile))
        pca = Image.fromarray(np.round(colour * 255).astype(np.uint8))
        canvas.paste(pca.resize((tile, tile), Image.Resampling.NEAREST), (tile, row * tile))
    return save_png_atomic(canvas, path)


def square_photo(name: str, size: int) -> np.ndarray:
    """The photo's centred square, RGB, resized to size x size: (size, size, 3) uint8."""
    photo = load_photo(name)
    if photo.ndim == 2:
        photo = np.repeat(photo[..., None], 3, axis=2)
    side = min(photo.shape[:2])
    top, left = (photo.shape[0] - side) // 2, (photo.shape[1] - side) // 2
    square = Image.fromarray(photo[top : top + side, left : left + side])
    return np.asarray(square.resize((size, size), Image.Resampling.BICUBIC))


def evaluate_pca_picture(
    model: torch.nn.Module,
    cfg: PcaPictureConfig,
    mean: Sequence[float],
    std: Sequence[float],
    picture_dir: Path,
    device: str = "cpu",
    batch_size: int = 256,
) -> dict[str, float]:
    """Draw ``picture_dir / "pca.png"``; returns ``pca_foreground_fraction`` (share of patches kept)."""
    cfg.validate()
    model = model.to(device)
    images = np.stack([square_photo(name, cfg.tile) for name in cfg.photos])  # (I, tile, tile, 3)
    features = dense_features(model, rgb_tensor(images, cfg.image_size, mean, std), batch_size)
    colours, foreground = pca_colours(features.patches.numpy(), cfg.threshold)
    draw_pca_picture(images, colours, Path(picture_dir) / PICTURE_NAME, cfg.tile)
    return {"pca_foreground_fraction": float(foreground.mean())}
