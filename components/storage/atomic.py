"""Whole-or-nothing local files: write beside the target, then rename over it.

A reader (another step, DVC, a person refreshing a picture) sees the old file or the new one, never
half of one; an interrupted write leaves only a hidden ``.part`` file that listings ignore. Every
local writer of a file another step reads goes through here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import polars as pl
    from PIL import Image


def replace_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """Call ``write`` with a temp file name in ``path``'s folder, then rename that file to ``path``.

    For writers that want a file name (parquet, safetensors); ``write_atomic`` is the handle form."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    os.close(fd)
    temp = Path(temp_name)
    try:
        write(temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write`` on a binary handle of a temp file in ``path``'s folder, then rename it to ``path``."""

    def through_handle(temp: Path) -> None:
        with temp.open("wb") as handle:
            write(handle)

    return replace_atomically(path, through_handle)


def write_text_atomic(text: str, path: Path) -> Path:
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))


def save_npy_atomic(array: np.ndarray, path: Path) -> Path:
    import numpy as np

    # A file object, not a name: np.save would append ".npy" to the temp name.
    return write_atomic(path, lambda handle: np.save(handle, array))


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> Path:
    return replace_atomically(path, lambda temp: frame.write_parquet(temp))


def save_png_atomic(image: Image.Image, path: Path) -> Path:
    """A PIL image as a PNG at ``path``, atomically."""
    return write_atomic(path, lambda handle: image.save(handle, format="PNG"))
