"""Natural photos and textures bundled in the scikit-image wheel (no download needed)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Loaders that read files shipped inside the wheel; others in skimage.data fetch over the network.
BUNDLED_PHOTOS = (
    "astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel",
    "grass", "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon",
    "page", "rocket", "text",
)


def load_photo(name: str) -> np.ndarray:
    """The named scikit-image photo as uint8, (H, W) grey or (H, W, 3) RGB."""
    import skimage.data

    loader: Callable[[], np.ndarray] | None = getattr(skimage.data, name, None)
    if loader is None or name.startswith("_"):
        raise ValueError(f"scikit-image has no bundled photo named {name!r}")
    image = np.asarray(loader())
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    elif image.dtype != np.uint8:
        lo, hi = float(image.min()), float(image.max())
        image = ((image - lo) / max(hi - lo, 1e-12) * 255.0).round().astype(np.uint8)
    if image.ndim == 3 and image.shape[2] == 4:  # RGBA logo: drop alpha
        image = image[..., :3]
    return image
