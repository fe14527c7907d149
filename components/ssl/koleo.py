"""KoLeo regulariser (DINOv2 §4 "KoLeo regularizer"; Sablayrolles et al. 2019, "Spreading vectors
for similarity search" — derived from the Kozachenko-Leonenko differential-entropy estimator).

For a batch of features ``x_1..x_n`` the loss is::

    L_koleo = -(1 / n) * sum_i log(d_i + eps),   d_i = || z_i - z_nn(i) + eps ||_2,   z = x / ||x||

where ``nn(i)`` is the nearest *other* sample (found by the largest dot product, equivalent for unit
vectors). Minimising it pushes the nearest neighbours apart and so spreads the features uniformly
within the batch. DINOv2 applies it with weight 0.1 to the student's CLS backbone features
(``x_norm_clstoken``) of each global crop separately — two crops of one image must not repel each
other — and sums the per-crop terms: :func:`koleo_loss_per_crop`.

Numerical safety (the official formula, written so it is visibly safe):
- ``eps`` appears twice as in the official ``nn.PairwiseDistance(2, eps=1e-8)`` + ``log(d + eps)``:
  inside the distance (``||z_i - z_j + eps||``, so an exact duplicate has distance ``eps * sqrt(D)``,
  not 0) and as a floor of the log's argument, ``d + eps >= eps``. Each sample's term is thus at most
  ``-log(eps) ≈ 18.4`` for eps = 1e-8: duplicates give a large but finite loss and finite gradients
  (of order 1/eps; DINOv2 clips gradients at 3.0);
- the nearest-neighbour search runs without gradient and masks the diagonal with -inf (the official
  code writes -1, which an antipodal pair ties, so a sample could be matched with itself);
- a batch of one has no neighbour: the loss is 0, returned as ``x.sum() * 0`` so it stays in the
  autograd graph (backward gives zero gradients instead of failing);
- the computation runs in at least float32 with autocast disabled, as the official code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULT_EPS = 1e-8


@torch.no_grad()
def nearest_neighbour_indices(unit_vectors: Tensor) -> Tensor:
    """Index of each row's nearest other row, for L2-normalised rows. (n, D) -> (n,) int64.

    For unit vectors ``||a - b||^2 = 2 - 2 a.b``, so the nearest neighbour has the largest dot product.
    """
    dots = unit_vectors @ unit_vectors.t()  # (n, n)
    dots.fill_diagonal_(float("-inf"))  # a sample is never its own neighbour
    return dots.argmax(dim=1)


def koleo_loss(features: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """KoLeo loss of one batch of features (n, D) -> 0-d tensor; 0 (in the graph) when n < 2."""
    compute_dtype = torch.promote_types(features.dtype, torch.float32)
    if features.shape[0] < 2:
        return features.to(compute_dtype).sum() * 0.0  # no neighbour to repel: a zero that keeps the graph
    with torch.autocast(device_type=features.device.type, enabled=False):
        z = F.normalize(features.to(compute_dtype), p=2, dim=-1, eps=eps)  # (n, D)
        neighbours = z[nearest_neighbour_indices(z)]  # (n, D)
        distances = F.pairwise_distance(z, neighbours, p=2.0, eps=eps)  # (n,) = ||z - z_nn + eps||
        return -torch.log(distances + eps).mean()


def koleo_loss_per_crop(features: Tensor, n_crops: int = 2, weight: float = 1.0, eps: float = DEFAULT_EPS) -> Tensor:
    """``weight * sum_c koleo(crop c)`` over the crop-major rows of ``features`` (n_crops * B, D).

    The official meta-architecture: ``koleo_loss_weight * sum(koleo(p) for p in cls.chunk(2))``, so
    the two global crops of one image never act as each other's neighbour.
    """
    if n_crops < 1 or features.shape[0] % n_crops != 0:
        raise ValueError(f"{features.shape[0]} rows cannot be split into {n_crops} equal crops")
    crops = features.split(features.shape[0] // n_crops) if features.shape[0] else [features]  # n_crops x (B, D)
    total = koleo_loss(crops[0], eps=eps)
    for crop in crops[1:]:
        total = total + koleo_loss(crop, eps=eps)
    return weight * total


class KoLeoLoss(nn.Module):
    """Module form of :func:`koleo_loss`, called as the official ``KoLeoLoss()(student_output)``."""

    def forward(self, student_output: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
        """(n, D) student features -> 0-d KoLeo loss."""
        return koleo_loss(student_output, eps=eps)
