"""Batch the multi-crop views and draw the iBOT masks of the global crops (DINOv2 §4, iBOT).

Semantics of the official ``dinov2/data/collate.py``, reproduced here:

* crops are stacked crop-major: ``[crop0 of every image, crop1 of every image, ...]``, so global
  crops are ``(2B, 3, G, G)`` and local crops ``(n_local * B, 3, L, L)``;
* of the ``N = 2B`` global crops, ``int(N * mask_probability)`` get a mask. Their ratios are
  stratified: with ``probs = linspace(ratio_min, ratio_max, n_masked + 1)``, masked crop ``i``
  asks the mask generator for ``int(n_tokens * uniform(probs[i], probs[i + 1]))`` patches. The
  other crops get an empty mask. The list of masks is then shuffled, so which crops are masked
  (and with which ratio) is random;
* ``masks_weight`` holds, for every masked token, ``1 / (masked tokens of its crop)``, so each
  masked crop carries a total weight of 1 in the iBOT loss whatever its mask size;
* ``upperbound`` is ``sum_i int(n_tokens * probs[i + 1])`` over the masked crops: the largest
  number of masked tokens the stratified ratios allow, which the trainer uses to size buffers;
* ``n_masked_patches`` is a 1-element long tensor with the actual number of masked tokens.

Differences from the official code:

* the randomness (ratios, shuffle, and the mask generator's own draws) comes from the ``rng``
  argument instead of the global ``random`` module. With a ``random.Random`` the draws are the
  official ones in the official order. Note for DataLoader workers: a ``functools.partial`` holding
  one ``rng`` is copied into every worker with the same state, so every worker would draw the same
  mask sequence; give each worker its own ``rng`` (e.g. seeded from ``torch.initial_seed()`` in
  ``worker_init_fn``), which the global-module version got from DataLoader's per-worker seeding;
* ``probs`` is computed in float32 explicitly (the official relies on the default dtype being
  float32), so the integer counts match the official ones bit for bit;
* a sample may be the augmentation dict itself or an ``(augmentation dict, target)`` pair (the
  official accepts only the pair, as its datasets return one);
* with zero local crops the local tensor is an empty ``(0,)`` tensor instead of a stack error.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypedDict

import numpy as np
import torch

from components.data.masking import MaskRng


class MaskSampler(Protocol):
    """Anything that draws a ``(h, w)`` bool mask with at most ``num_masking_patches`` set."""

    def __call__(self, num_masking_patches: int, rng: MaskRng) -> np.ndarray: ...


class CollatedBatch(TypedDict):
    collated_global_crops: torch.Tensor  # (2B, 3, G, G)
    collated_local_crops: torch.Tensor  # (n_local * B, 3, L, L)
    collated_masks: torch.Tensor  # (2B, n_tokens) bool
    mask_indices_list: torch.Tensor  # (M,) long, flat indices into collated_masks
    masks_weight: torch.Tensor  # (M,) float32
    upperbound: int
    n_masked_patches: torch.Tensor  # (1,) long, == M


def crops_of(sample: Mapping[str, Any] | Sequence[Any]) -> Mapping[str, Any]:
    """The augmentation dict of a sample given as the dict or as an ``(dict, target)`` pair."""
    if isinstance(sample, Mapping):
        return sample
    return sample[0]


def stack_crop_major(samples: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
    """Stack ``samples[b][key][i]`` in the official order: for each crop index ``i``, every sample ``b``."""
    n_crops = len(samples[0][key])
    if n_crops == 0:
        return torch.empty(0)
    return torch.stack([sample[key][i] for i in range(n_crops) for sample in samples])


def random_unit(rng: MaskRng) -> float:
    """A float uniform in [0, 1) from either kind of generator."""
    return rng.random() if isinstance(rng, random.Random) else float(rng.random())


def shuffle_in_place(items: list[Any], rng: MaskRng) -> None:
    """Shuffle with the given generator (``random.Random.shuffle`` is the official call)."""
    if isinstance(rng, random.Random):
        rng.shuffle(items)
        return
    items[:] = [items[i] for i in rng.permutation(len(items))]


def draw_masks(
    n_crops: int,
    n_tokens: int,
    mask_ratio_tuple: tuple[float, float],
    mask_probability: float,
    mask_generator: MaskSampler,
    rng: MaskRng,
) -> tuple[list[torch.Tensor], int]:
    """Stratified-ratio masks for ``int(n_crops * mask_probability)`` crops, empty ones for the rest.

    Returns the shuffled masks and the official ``upperbound`` on their masked-token total.
    """
    n_masked_crops = int(n_crops * mask_probability)
    probs = torch.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked_crops + 1, dtype=torch.float32)
    masks: list[torch.Tensor] = []
    upperbound = 0
    for i in range(n_masked_crops):
        low, high = probs[i], probs[i + 1]
        # Same float32 arithmetic as the official random.uniform(low, high) on two float32 tensors.
        ratio = low + (high - low) * random_unit(rng)
        masks.append(torch.from_numpy(mask_generator(int(n_tokens * ratio), rng)))
        upperbound += int(n_tokens * high)
    for _ in range(n_masked_crops, n_crops):
        masks.append(torch.from_numpy(mask_generator(0, rng)))
    shuffle_in_place(masks, rng)
    return masks, upperbound


def collate_data_and_cast(
    samples_list: Sequence[Mapping[str, Any] | Sequence[Any]],
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    *,
    n_tokens: int,
    mask_generator: MaskSampler,
    rng: MaskRng,
) -> CollatedBatch:
    """Collate ``DataAugmentationDINO`` outputs into the official DINOv2 training batch.

    ``n_tokens`` is the number of patch tokens of a global crop, ``(G // patch) ** 2``; the mask
    generator's grid must have that many cells.
    """
    samples = [crops_of(sample) for sample in samples_list]
    global_crops = stack_crop_major(samples, "global_crops")  # (2B, 3, G, G)
    local_crops = stack_crop_major(samples, "local_crops")  # (n_local * B, 3, L, L)
    return mask_and_cast(global_crops, local_crops, mask_ratio_tuple, mask_probability, dtype,
                         n_tokens=n_tokens, mask_generator=mask_generator, rng=rng)


def mask_and_cast(
    global_crops: torch.Tensor,
    local_crops: torch.Tensor,
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    *,
    n_tokens: int,
    mask_generator: MaskSampler,
    rng: MaskRng,
) -> CollatedBatch:
    """The training batch from crops already stacked crop-major (``global_crops`` (2B, 3, G, G), ``local_crops``
    (n_local * B, 3, L, L)): iBOT masks for the global crops, then the official batch dict. Shared by the
    per-sample collate above and the batched augmentation path (components/data/batched_multicrop.py)."""
    masks, upperbound = draw_masks(len(global_crops), n_tokens, mask_ratio_tuple, mask_probability,
                                   mask_generator, rng)
    return cast_batch(global_crops, local_crops, masks, upperbound, n_tokens, dtype)


def cast_batch(global_crops: torch.Tensor, local_crops: torch.Tensor, masks: Sequence[torch.Tensor], upperbound: int,
               n_tokens: int, dtype: torch.dtype = torch.float32) -> CollatedBatch:
    """The official batch dict from stacked crops and one ``(h, w)`` bool mask per global crop (in crop order)."""
    if len(masks) != len(global_crops):
        raise ValueError(f"{len(masks)} masks for {len(global_crops)} global crops")
    if masks[0].numel() != n_tokens:
        raise ValueError(f"mask generator grid has {masks[0].numel()} cells but n_tokens is {n_tokens}")
    collated_masks = torch.stack(list(masks)).flatten(1)  # (2B, n_tokens) bool
    mask_indices_list = collated_masks.flatten().nonzero().flatten()  # (M,)
    # Every masked token of a crop weighs 1 / (masked tokens of that crop); clamp avoids 1/0 rows.
    per_crop_weight = 1.0 / collated_masks.sum(-1).clamp(min=1.0)  # (2B,)
    masks_weight = per_crop_weight.unsqueeze(-1).expand_as(collated_masks)[collated_masks]  # (M,)

    return {
        "collated_global_crops": global_crops.to(dtype),
        "collated_local_crops": local_crops.to(dtype),
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
