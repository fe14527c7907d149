"""Block-wise masking of the patch grid for the iBOT masked-image-modelling loss (DINOv2 §4).

DINOv2 masks student patch tokens with the block-wise scheme of BEiT (Bao et al. 2021, §2.2,
Algorithm 1), as iBOT does: random axis-aligned rectangles are added to the mask until a patch
budget is reached. One rectangle is proposed at a time:

* its target area is uniform in ``[min_num_patches, remaining budget]`` (the remaining budget is
  also capped by ``max_num_patches``),
* its aspect ratio h/w is log-uniform in ``[min_aspect, max_aspect]`` (``max_aspect`` defaults
  to ``1 / min_aspect``, i.e. [0.3, 3.33] by default),
* ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))``; the rectangle must be
  strictly narrower and strictly shorter than the grid,
* it is accepted only if it adds at least one new patch and no more than the remaining budget.

Ten proposals are tried per rectangle; when all ten fail the mask is returned as it is, so the
masked count is at most the budget and can fall short of it (as in BEiT and the official code).

Consequences of the rounding that users sometimes expect otherwise (the official code behaves the
same way): a rectangle can be slightly smaller than ``min_num_patches`` (area 4 with aspect 0.55
rounds to 1×3) and its rounded aspect can lie slightly outside the bounds; only the unrounded
proposal obeys them exactly. Overlapping rectangles merge, so the new patches a rectangle adds can
be fewer than its area.

Differences from the official ``dinov2/data/masking.py``:

* randomness comes from an explicit ``random.Random`` or ``numpy.random.Generator`` passed to each
  call (the official code draws from the global ``random`` module). With a ``random.Random`` the
  draws are the same calls in the same order as the official code (``uniform``, ``uniform``,
  ``randint``, ``randint`` per proposal), so a ``random.Random`` seeded like the global module
  reproduces the official masks;
* with neither ``num_masking_patches`` nor ``max_num_patches`` given, a rectangle is capped by the
  grid size (the official code would fail comparing an int with ``None``);
* the rectangle is filled with one slice assignment instead of a Python double loop (same result).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

MaskRng = random.Random | np.random.Generator

# BEiT's number of proposals per rectangle before giving up on the budget.
PROPOSALS_PER_BLOCK = 10


@dataclass(frozen=True)
class Block:
    """An axis-aligned rectangle of patches: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


def uniform(rng: MaskRng, low: float, high: float) -> float:
    """A float uniform between ``low`` and ``high`` (either order, as ``random.uniform`` allows)."""
    if isinstance(rng, random.Random):
        return rng.uniform(low, high)
    return low + (high - low) * float(rng.random())


def randint_inclusive(rng: MaskRng, low: int, high: int) -> int:
    """An integer uniform in ``[low, high]``, both ends included (``random.randint`` semantics)."""
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    return int(rng.integers(low, high, endpoint=True))


def official_max_num_patches(image_size: int, patch_size: int) -> float:
    """The official trainer's cap on one rectangle: ``0.5 * img_size // patch_size * img_size // patch_size``.

    Evaluated left to right as Python does, which is not always half the grid: 128.0 at 224 px and
    patch 14 (16×16 grid, exactly half) but 21.0 at 28 px and patch 4 (7×7 grid, 24.5 would be half).
    """
    return 0.5 * image_size // patch_size * image_size // patch_size


class MaskingGenerator:
    """BEiT block-wise mask sampler over a ``height × width`` grid of patches.

    ``input_size`` is the patch grid (image size // patch size), e.g. 16 for 224 px and patch 14,
    7 for 28 px and patch 4. ``num_masking_patches`` only serves as the default of
    ``max_num_patches`` (the cap on one rectangle's area), as in the official code; the budget of
    a mask is the argument of each call.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
        if height < 1 or width < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be > 0, got {min_aspect}")
        max_aspect = 1.0 / min_aspect if max_aspect is None else max_aspect
        if max_aspect < min_aspect:
            raise ValueError(f"max_aspect {max_aspect} is below min_aspect {min_aspect}")
        self.height = height
        self.width = width
        self.num_patches = height * width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = num_masking_patches if num_masking_patches is not None else self.num_patches
        self.max_num_patches = max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        low, high = (math.exp(v) for v in self.log_aspect_ratio)
        return (
            f"MaskingGenerator({self.height}x{self.width}, block area [{self.min_num_patches}, "
            f"{self.max_num_patches}], aspect [{low:.3f}, {high:.3f}])"
        )

    def get_shape(self) -> tuple[int, int]:
        """The patch grid ``(height, width)`` of the masks this generator returns."""
        return self.height, self.width

    def propose_block(self, max_new_patches: float, rng: MaskRng) -> Block | None:
        """One BEiT proposal: a rectangle that fits strictly inside the grid, or None if it does not."""
        target_area = uniform(rng, self.min_num_patches, max_new_patches)
        aspect_ratio = math.exp(uniform(rng, *self.log_aspect_ratio))
        # Python's round (half to even) as in the official code, so seeded masks match it.
        height = round(math.sqrt(target_area * aspect_ratio))
        width = round(math.sqrt(target_area / aspect_ratio))
        if not (width < self.width and height < self.height):
            return None
        top = randint_inclusive(rng, 0, self.height - height)
        left = randint_inclusive(rng, 0, self.width - width)
        return Block(top=top, left=left, height=height, width=width)

    def add_block(self, mask: np.ndarray, max_new_patches: float, rng: MaskRng) -> int:
        """Add one rectangle to ``mask`` in place; returns how many patches became masked (0 = gave up)."""
        for _ in range(PROPOSALS_PER_BLOCK):
            block = self.propose_block(max_new_patches, rng)
            if block is None:
                continue
            region = mask[block.top : block.top + block.height, block.left : block.left + block.width]
            new_patches = block.height * block.width - int(region.sum())
            # A rectangle that adds nothing, or more than the budget allows, is rejected.
            if 0 < new_patches <= max_new_patches:
                region[...] = True
                return new_patches
        return 0

    def __call__(self, num_masking_patches: int, rng: MaskRng) -> np.ndarray:
        """A ``(height, width)`` bool mask with at most ``num_masking_patches`` masked patches."""
        mask = np.zeros(self.get_shape(), dtype=bool)  # (H, W)
        masked = 0
        while masked < num_masking_patches:
            max_new_patches = min(num_masking_patches - masked, self.max_num_patches)
            added = self.add_block(mask, max_new_patches, rng)
            if added == 0:
                break
            masked += added
        return mask
