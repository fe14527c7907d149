"""Whole-or-nothing local files: write beside the target, then rename over it.

A reader (another step, DVC, a person refreshing a picture) sees the old file or the new one, never
half of one; an interrupted write leaves only a hidden ``.part`` file that listings ignore.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write`` on a temp file in ``path``'s folder, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        os.replace(temp_name, path)
    finally:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
    return path


def save_png_atomic(image: Image.Image, path: Path) -> Path:
    """A PIL image as a PNG at ``path``, atomically."""
    return write_atomic(path, lambda handle: image.save(handle, format="PNG"))
