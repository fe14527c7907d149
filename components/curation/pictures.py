"""Pictures a person can check: sample images per cluster and the detected duplicate groups (PNG grids).

Each row of a grid is one group with a text label on its left; cells are ``cell`` x ``cell`` pixels
(images are fitted inside, aspect ratio kept, on grey). Files are written atomically (temp + rename).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from components.storage import read_uri
from components.storage.atomic import save_png_atomic

LABEL_WIDTH = 150  # px of text column on the left of each row
BACKGROUND = (255, 255, 255)
EMPTY_CELL = (200, 200, 200)
KEPT_BORDER = (0, 160, 0)  # duplicate groups: the kept image
REMOVED_BORDER = (200, 0, 0)  # duplicate groups: the removed ones


def load_thumbnail(uri: str, cell: int, read: Callable[[str], bytes] = read_uri) -> Image.Image:
    """The image fitted in ``cell`` x ``cell``; a grey cell when it cannot be read (never fails the grid)."""
    try:
        with Image.open(io.BytesIO(read(uri))) as image:
            thumb = image.convert("RGB")
            thumb.thumbnail((cell, cell), Image.Resampling.BICUBIC)  # only ever shrinks
            if max(thumb.size) < cell:  # 28x28 images: upscaled with NEAREST so pixels stay visible
                scale = cell / max(thumb.size)
                thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                                     Image.Resampling.NEAREST)
    except Exception:  # a picture is a report, not a gate: an unreadable image is shown as an empty cell
        return Image.new("RGB", (cell, cell), EMPTY_CELL)
    canvas = Image.new("RGB", (cell, cell), EMPTY_CELL)
    canvas.paste(thumb, ((cell - thumb.width) // 2, (cell - thumb.height) // 2))
    return canvas


def grid(rows: Sequence[tuple[str, Sequence[str]]], path: Path, per_row: int, cell: int = 64,
         borders: Callable[[int], tuple[int, int, int] | None] = lambda column: None,
         read: Callable[[str], bytes] = read_uri) -> Path:
    """A PNG with one row per (label, uris): up to ``per_row`` images each. ``borders(column)`` colours a frame."""
    pad = 4
    width = LABEL_WIDTH + per_row * (cell + pad) + pad
    height = max(1, len(rows)) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if not rows:
        draw.text((pad, pad), "nothing to show", fill=(0, 0, 0))
    for r, (label, uris) in enumerate(rows):
        top = pad + r * (cell + pad)
        draw.text((pad, top + cell // 2 - 6), label[:24], fill=(0, 0, 0))
        for c, uri in enumerate(list(uris)[:per_row]):
            left = LABEL_WIDTH + pad + c * (cell + pad)
            canvas.paste(load_thumbnail(uri, cell, read), (left, top))
            colour = borders(c)
            if colour is not None:
                draw.rectangle((left, top, left + cell - 1, top + cell - 1), outline=colour, width=2)
    return save_png_atomic(canvas, path)


def cluster_grid(clusters: Sequence[tuple[str, Sequence[str]]], path: Path, per_row: int = 8, cell: int = 64,
                 read: Callable[[str], bytes] = read_uri) -> Path:
    """Rows = clusters ("cluster 3 (n=41)", sample uris)."""
    return grid(clusters, path, per_row, cell, read=read)


def duplicate_grid(groups: Sequence[tuple[str, Sequence[str]]], path: Path, per_row: int = 8, cell: int = 64,
                   read: Callable[[str], bytes] = read_uri) -> Path:
    """Rows = duplicate components (label, [kept uri, removed uris...]): kept framed green, removed red."""
    return grid(groups, path, per_row, cell, borders=lambda c: KEPT_BORDER if c == 0 else REMOVED_BORDER, read=read)


__all__ = ["cluster_grid", "duplicate_grid", "grid", "load_thumbnail", "save_png_atomic"]
