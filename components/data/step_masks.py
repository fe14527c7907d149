"""iBOT masks of a training step, drawn for the step's *global* batch, so they differ across ranks and do
not depend on the world size.

The official code draws masks per rank batch in seeded loader workers. dinoflow draws them in the main
process and keys them so that a resume on another number of processes gives the same samples the same
masks:

* the step's global batch has ``G`` samples at stream offsets ``0..G-1`` (the sampler gives rank ``r`` of
  ``W`` the offsets ``r, r + W, r + 2W, ...``), so ``2G`` global-crop *slots*: slot ``c * G + o`` is
  crop ``c`` of the sample at offset ``o`` (crop-major, the order of a one-process batch);
* the **plan** says for every slot whether it is masked and with which ratio bin: the official
  stratification (``int(2G * probability)`` masked crops, ratio bins ``linspace(min, max, n + 1)``,
  shuffled) applied to the global batch, from a generator keyed by (seed, step). Every rank computes the
  same plan (``O(G)`` cheap draws);
* each masked slot's mask (ratio inside its bin, then the blocks) comes from a generator keyed by
  (seed, step, slot), so a rank draws only its own crops' masks.

A one-process run over the concatenated rank batches therefore draws exactly the masks of the ranks
together, and a rank may well get no masked crop at all (the losses handle that without a collective
going unmatched).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from components.data.collate import MaskSampler, shuffle_in_place

N_GLOBAL_CROPS = 2
_PLAN_TAG, _SLOT_TAG = 0x6D61736B, 0x736C6F74  # "mask", "slot": separate streams for plan and masks

RatioBin = tuple[float, float]


def plan_generator(seed: int, step: int) -> random.Random:
    return random.Random(int(np.random.SeedSequence([seed, step, _PLAN_TAG]).generate_state(1)[0]))


def slot_generator(seed: int, step: int, slot: int) -> random.Random:
    return random.Random(int(np.random.SeedSequence([seed, step, slot, _SLOT_TAG]).generate_state(1)[0]))


def mask_plan(n_slots: int, mask_ratio_tuple: tuple[float, float], mask_probability: float,
              rng: random.Random) -> list[RatioBin | None]:
    """Per slot: the ratio bin ``(low, high)`` of its mask, or None for an unmasked crop (official
    stratification over ``n_slots`` crops, shuffled)."""
    n_masked = int(n_slots * mask_probability)
    # float32 as the official collate, so the integer token counts match its arithmetic.
    probs = torch.linspace(mask_ratio_tuple[0], mask_ratio_tuple[1], n_masked + 1, dtype=torch.float32)
    plan: list[RatioBin | None] = [(float(probs[i]), float(probs[i + 1])) for i in range(n_masked)]
    plan += [None] * (n_slots - n_masked)
    shuffle_in_place(plan, rng)
    return plan


def rank_offsets(rank: int, world_size: int, n_samples: int) -> list[int]:
    """Stream offsets within the step of rank ``rank``'s first ``n_samples`` samples."""
    return [rank + k * world_size for k in range(n_samples)]


def step_masks(offsets: Sequence[int], global_batch: int, n_tokens: int, mask_ratio_tuple: tuple[float, float],
               mask_probability: float, mask_generator: MaskSampler, seed: int, step: int
               ) -> tuple[list[torch.Tensor], int]:
    """Masks of the global crops of the samples at ``offsets`` (crop-major: crop 0 of every sample, then crop 1)
    and the official ``upperbound`` of their masked-token total."""
    if any(not 0 <= o < global_batch for o in offsets):
        raise ValueError(f"sample offsets must lie in [0, {global_batch}), got {list(offsets)}")
    plan = mask_plan(N_GLOBAL_CROPS * global_batch, mask_ratio_tuple, mask_probability, plan_generator(seed, step))
    masks: list[torch.Tensor] = []
    upperbound = 0
    for crop in range(N_GLOBAL_CROPS):
        for offset in offsets:
            slot = crop * global_batch + offset
            ratio_bin = plan[slot]
            if ratio_bin is None:
                masks.append(torch.from_numpy(mask_generator(0, random.Random(0))))
                continue
            low, high = ratio_bin
            rng = slot_generator(seed, step, slot)
            ratio = low + (high - low) * rng.random()
            masks.append(torch.from_numpy(mask_generator(int(n_tokens * ratio), rng)))
            upperbound += int(n_tokens * high)
    return masks, upperbound
