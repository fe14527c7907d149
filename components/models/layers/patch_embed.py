"""Patch embedding: a strided convolution turns an image into a sequence of patch tokens."""

from __future__ import annotations

from torch import Tensor, nn


def as_pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class PatchEmbed(nn.Module):
    """``(B, C, H, W)`` -> ``(B, H/p * W/p, D)``, row-major over the patch grid (official ``proj`` name).

    ``img_size`` only sets the reference grid (``patches_resolution``, ``num_patches``) that the
    position embedding is learned on; any input whose sides are multiples of the patch size works.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size = as_pair(img_size)
        self.patch_size = as_pair(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        if height % self.patch_size[0] or width % self.patch_size[1]:
            raise ValueError(f"input {height}x{width} is not a multiple of the patch size {self.patch_size}")
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)
