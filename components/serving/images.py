"""Turn what an HTTP client can send into a list of RGB float images in [0, 1].

Accepted, as ``model_input`` of the pyfunc model (what MLflow's scoring server hands over):

- a numpy array (B, H, W, 3) or (H, W, 3): integer values are 0-255 (JSON numbers arrive as int64),
  floating values are already in [0, 1];
- a pandas DataFrame, or a dict of columns, whose ``image`` column (or only column) holds encoded
  image files (PNG, JPEG, ... ) as bytes or as base64 strings; sizes may differ between rows;
- a list of any of the above per image.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

IMAGE_COLUMN = "image"


def decode_images(model_input: Any) -> list[np.ndarray]:
    """``model_input`` -> images, each (H, W, 3) float32 in [0, 1]."""
    column = image_column(model_input)
    if column is not None:
        return [decode_encoded(value) for value in column]
    if isinstance(model_input, np.ndarray) and model_input.dtype != object:
        return split_array(model_input)
    if isinstance(model_input, (list, tuple)) or (isinstance(model_input, np.ndarray) and model_input.dtype == object):
        return [image for item in model_input for image in decode_item(item)]
    raise TypeError(f"cannot read images from {type(model_input).__name__}; see components/serving/images.py")


def image_column(model_input: Any) -> list[Any] | None:
    """The encoded-image column of a DataFrame or a dict of columns, if ``model_input`` is one."""
    columns: Mapping[str, Any] | None = None
    if hasattr(model_input, "columns") and hasattr(model_input, "__getitem__"):  # pandas DataFrame
        columns = {str(c): model_input[c] for c in model_input.columns}
    elif isinstance(model_input, Mapping):
        columns = {str(k): v for k, v in model_input.items()}
    if columns is None:
        return None
    if IMAGE_COLUMN in columns:
        return list(columns[IMAGE_COLUMN])
    if len(columns) == 1:
        return list(next(iter(columns.values())))
    raise ValueError(f"expected a column named {IMAGE_COLUMN!r} among {sorted(columns)}")


def decode_item(item: Any) -> list[np.ndarray]:
    if isinstance(item, (bytes, str)):
        return [decode_encoded(item)]
    return split_array(np.asarray(item))


def split_array(array: np.ndarray) -> list[np.ndarray]:
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected images shaped (B, H, W, 3) or (H, W, 3), got {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        scaled = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        scaled = array.astype(np.float32)
    else:
        raise TypeError(f"image arrays must be integer (0-255) or floating ([0, 1]), got {array.dtype}")
    return list(scaled)  # B x (H, W, 3)


def decode_encoded(value: Any) -> np.ndarray:
    """An encoded image file (bytes, or its base64 text) -> (H, W, 3) float32 in [0, 1]."""
    from PIL import Image

    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise ValueError("an image string must be base64 of an encoded image file") from exc
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"expected encoded image bytes or base64 text, got {type(value).__name__}")
    with Image.open(io.BytesIO(value)) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    return rgb / 255.0
