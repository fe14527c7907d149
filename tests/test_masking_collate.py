"""Block-wise masking (BEiT/iBOT) and the DINOv2 collate: budgets, block geometry, ordering, weights."""

from __future__ import annotations

import math
import pickle
import random
from typing import Any

import numpy as np
import pytest
import torch

from components.data.collate import MaskSampler, collate_data_and_cast
from components.data.masking import MaskingGenerator, MaskRng, official_max_num_patches, randint_inclusive
from components.data.multicrop import DataAugmentationDINO, fashion_mnist_config


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return rows[0], cols[0], rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


# ---------------------------------------------------------------- masking generator


def test_shape_for_square_and_rectangular_grids() -> None:
    assert MaskingGenerator(7).get_shape() == (7, 7)
    generator = MaskingGenerator((6, 9))
    assert generator.get_shape() == (6, 9)
    mask = generator(20, random.Random(0))
    assert mask.shape == (6, 9) and mask.dtype == np.bool_


def test_official_block_cap_keeps_the_trainers_left_to_right_arithmetic() -> None:
    assert official_max_num_patches(224, 14) == 128.0
    assert official_max_num_patches(224, 16) == 98.0
    assert official_max_num_patches(28, 4) == 21.0


def test_zero_budget_gives_an_empty_mask() -> None:
    assert not MaskingGenerator(16)(0, random.Random(0)).any()


@pytest.mark.parametrize("grid", [16, 7, (6, 9)])
def test_masked_count_never_exceeds_the_budget_and_nearly_reaches_it(grid: int | tuple[int, int]) -> None:
    generator = MaskingGenerator(grid, max_num_patches=None)
    n_cells = generator.height * generator.width
    rng = random.Random(1)
    fills = []
    for budget in range(0, n_cells // 2 + 1):
        for _ in range(20):
            count = int(generator(budget, rng).sum())
            assert count <= budget
            if budget >= generator.min_num_patches:
                # The loop stops only when 10 proposals in a row fail; with this much room that happens
                # only when the remaining budget is below one block (observed shortfall <= 2 patches).
                assert count >= budget - generator.min_num_patches
                fills.append(count / budget)
    assert np.mean(fills) > 0.95


def test_one_block_is_a_solid_rectangle_within_the_rounded_area_and_aspect_bounds() -> None:
    generator = MaskingGenerator(14, min_num_patches=4, min_aspect=0.3)
    min_aspect, max_aspect = 0.3, 1 / 0.3
    rng = random.Random(2)
    shapes = []
    for _ in range(2000):
        budget = rng.randint(4, 60)
        mask = np.zeros((14, 14), dtype=bool)
        added = generator.add_block(mask, budget, rng)
        assert added > 0
        top, left, h, w = bounding_box(mask)
        assert mask[top : top + h, left : left + w].all() and added == h * w  # one solid rectangle
        assert h < 14 and w < 14 and h * w <= budget
        # h and w are round(x), round(y) with x*y >= min_num_patches and x/y in the aspect bounds.
        assert (h + 0.5) * (w + 0.5) >= generator.min_num_patches
        assert (h - 0.5) / (w + 0.5) <= max_aspect and (h + 0.5) / (w - 0.5) >= min_aspect
        shapes.append((h, w))
    heights, widths = np.array(shapes).T
    log_aspects = np.log(heights / widths)
    # Rounding lets a few blocks fall under min_num_patches (e.g. 1x3); most are at least that big.
    assert np.mean(heights * widths >= 4) > 0.9
    # Log-uniform aspect over a range symmetric in log space: tall and wide blocks equally often.
    assert (heights > widths).mean() == pytest.approx((widths > heights).mean(), abs=0.05)
    assert abs(log_aspects.mean()) < 0.05
    assert log_aspects.max() > math.log(2.0) and log_aspects.min() < -math.log(2.0)


def test_max_num_patches_caps_every_block() -> None:
    class Recording(MaskingGenerator):
        def __init__(self) -> None:
            super().__init__(16, max_num_patches=6)
            self.added: list[int] = []

        def add_block(self, mask: np.ndarray, max_new_patches: float, rng: MaskRng) -> int:
            self.added.append(super().add_block(mask, max_new_patches, rng))
            return self.added[-1]

    generator = Recording()
    rng = random.Random(3)
    for _ in range(50):
        assert generator(80, rng).sum() <= 80
    assert max(generator.added) <= 6 and len(generator.added) > 50 * 10


@pytest.mark.parametrize("make_rng", [random.Random, np.random.default_rng])
def test_masks_are_reproducible_from_the_seed(make_rng: type) -> None:
    generator = MaskingGenerator(16, max_num_patches=128)
    first = [generator(60, make_rng(7)) for _ in range(3)]
    rng_a, rng_b, rng_c = make_rng(11), make_rng(11), make_rng(12)
    sequence_a = [generator(60, rng_a) for _ in range(5)]
    sequence_b = [generator(60, rng_b) for _ in range(5)]
    sequence_c = [generator(60, rng_c) for _ in range(5)]
    assert all(np.array_equal(first[0], m) for m in first)
    assert all(np.array_equal(a, b) for a, b in zip(sequence_a, sequence_b, strict=True))
    assert not all(np.array_equal(a, c) for a, c in zip(sequence_a, sequence_c, strict=True))


def test_masking_leaves_the_global_random_state_alone() -> None:
    state_py, state_np = random.getstate(), pickle.dumps(np.random.get_state())
    MaskingGenerator(16)(50, random.Random(0))
    MaskingGenerator(16)(50, np.random.default_rng(0))
    assert random.getstate() == state_py
    assert pickle.dumps(np.random.get_state()) == state_np


def test_randint_is_inclusive_for_both_generators() -> None:
    for rng in (random.Random(0), np.random.default_rng(0)):
        draws = {randint_inclusive(rng, 2, 4) for _ in range(300)}
        assert draws == {2, 3, 4}


@pytest.mark.parametrize("kwargs", [{"input_size": 0}, {"input_size": (4, 0)}, {"input_size": 4, "min_aspect": 0.0},
                                    {"input_size": 4, "min_aspect": 2.0, "max_aspect": 1.0}])
def test_masking_generator_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MaskingGenerator(**kwargs)


# ---------------------------------------------------------------- collate


class ExactCountMasks:
    """A mask sampler that masks exactly the requested number of random cells (isolates collate's logic)."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, num_masking_patches: int, rng: MaskRng) -> np.ndarray:
        cells = list(range(self.side * self.side))
        chosen = random.Random(randint_inclusive(rng, 0, 10**9)).sample(cells, num_masking_patches)
        mask = np.zeros(self.side * self.side, dtype=bool)
        mask[chosen] = True
        return mask.reshape(self.side, self.side)


def coded_samples(batch: int, n_local: int, global_size: int = 4, local_size: int = 2) -> list[tuple[dict, int]]:
    """(augmentation dict, target) pairs whose crop tensors hold a code of (crop, image), exact in bfloat16."""
    samples = []
    for b in range(batch):
        crops = {
            "global_crops": [torch.full((3, global_size, global_size), 100.0 * c + b) for c in range(2)],
            "local_crops": [torch.full((3, local_size, local_size), 200.0 + 10 * c + b) for c in range(n_local)],
            "offsets": (),
        }
        crops["global_crops_teacher"] = crops["global_crops"]
        samples.append((crops, b))
    return samples


def collate(samples: list, side: int = 7, rng: MaskRng | None = None, mask_generator: MaskSampler | None = None,
            **kwargs: Any) -> dict:
    return dict(collate_data_and_cast(
        samples, n_tokens=side * side, mask_generator=mask_generator or ExactCountMasks(side),
        rng=rng if rng is not None else random.Random(0), **kwargs,
    ))


def test_crops_are_stacked_crop_major_and_cast() -> None:
    batch, n_local = 3, 4
    out = collate(coded_samples(batch, n_local), dtype=torch.bfloat16)
    globals_, locals_ = out["collated_global_crops"], out["collated_local_crops"]
    assert globals_.shape == (2 * batch, 3, 4, 4) and globals_.dtype == torch.bfloat16
    assert locals_.shape == (n_local * batch, 3, 2, 2) and locals_.dtype == torch.bfloat16
    # Official order: every image's crop 0, then every image's crop 1, ... (bfloat16 keeps these integers exact)
    assert globals_[:, 0, 0, 0].float().tolist() == [100.0 * c + b for c in range(2) for b in range(batch)]
    assert locals_[:, 0, 0, 0].float().tolist() == [200.0 + 10 * c + b for c in range(n_local) for b in range(batch)]
    assert out["collated_masks"].shape == (2 * batch, 49) and out["collated_masks"].dtype == torch.bool


def test_samples_may_be_plain_dicts() -> None:
    pairs = coded_samples(2, 1)
    from_pairs = collate(pairs)
    from_dicts = collate([crops for crops, _ in pairs])
    for key in ("collated_global_crops", "collated_local_crops", "collated_masks"):
        assert torch.equal(from_pairs[key], from_dicts[key])


@pytest.mark.parametrize(("batch", "probability"), [(3, 0.5), (3, 0.3), (4, 1.0), (4, 0.0), (5, 0.5)])
def test_exactly_int_n_times_p_crops_are_masked_with_stratified_ratios(batch: int, probability: float) -> None:
    n_crops, n_tokens = 2 * batch, 49
    n_masked = int(n_crops * probability)
    probs = torch.linspace(0.1, 0.5, n_masked + 1, dtype=torch.float32)
    for seed in range(10):
        out = collate(coded_samples(batch, 1), rng=random.Random(seed), mask_probability=probability)
        counts = out["collated_masks"].sum(1)  # (2B,)
        assert int((counts > 0).sum()) == n_masked
        # Stratum i asks for int(n_tokens * U(probs[i], probs[i+1])) patches; strata do not overlap,
        # so the i-th smallest count belongs to stratum i.
        masked_counts = sorted(int(c) for c in counts if c > 0)
        for i, count in enumerate(masked_counts):
            assert int(n_tokens * probs[i]) <= count <= int(n_tokens * probs[i + 1])
        assert out["upperbound"] == sum(int(n_tokens * probs[i + 1]) for i in range(n_masked))


def test_upperbound_matches_hand_computed_official_values() -> None:
    # 6 crops, p=0.5 -> 3 masked, probs = [0.1, 0.2333, 0.3667, 0.5]: int(11.43) + int(17.97) + int(24.5).
    assert collate(coded_samples(3, 1))["upperbound"] == 11 + 17 + 24
    # 4 crops, 16x16 grid -> 2 masked, probs = [0.1, 0.3, 0.5]: int(76.8) + int(128.0).
    assert collate(coded_samples(2, 1), side=16)["upperbound"] == 76 + 128


def test_masks_weight_indices_and_count_are_consistent() -> None:
    out = collate(coded_samples(8, 1), side=16, mask_generator=MaskingGenerator(16, max_num_patches=128))
    masks = out["collated_masks"]
    counts = masks.sum(1)
    indices = out["mask_indices_list"]
    assert torch.equal(indices, torch.from_numpy(np.flatnonzero(masks.flatten().numpy())))
    assert torch.equal(out["n_masked_patches"], torch.tensor([len(indices)]))
    assert out["masks_weight"].shape == indices.shape
    # Each masked token weighs 1 / (masked tokens of its crop): each masked crop sums to 1.
    rows = indices // masks.shape[1]
    assert torch.allclose(out["masks_weight"], 1.0 / counts[rows].float())
    assert out["masks_weight"].sum().item() == pytest.approx(int((counts > 0).sum()), abs=1e-4)
    assert int((counts > 0).sum()) == 8
    assert out["n_masked_patches"].item() <= out["upperbound"]


def test_which_crops_are_masked_is_shuffled_and_seeded() -> None:
    patterns = set()
    for seed in range(30):
        first = collate(coded_samples(4, 1), rng=random.Random(seed))["collated_masks"]
        again = collate(coded_samples(4, 1), rng=random.Random(seed))["collated_masks"]
        assert torch.equal(first, again)
        patterns.add(tuple((first.sum(1) > 0).tolist()))
    # 4 of 8 crops masked: 70 possible patterns; 30 seeds must show many, not always the first four.
    assert len(patterns) > 10


def test_numpy_generator_works_and_is_seeded() -> None:
    first = collate(coded_samples(4, 1), rng=np.random.default_rng(5), mask_generator=MaskingGenerator(7))
    again = collate(coded_samples(4, 1), rng=np.random.default_rng(5), mask_generator=MaskingGenerator(7))
    assert torch.equal(first["collated_masks"], again["collated_masks"])
    assert int((first["collated_masks"].sum(1) > 0).sum()) == 4


def test_grid_that_does_not_match_n_tokens_is_rejected() -> None:
    with pytest.raises(ValueError, match="n_tokens"):
        collate_data_and_cast(coded_samples(2, 1), n_tokens=50, mask_generator=MaskingGenerator(7),
                              rng=random.Random(0))


def test_no_local_crops_gives_an_empty_tensor() -> None:
    assert collate(coded_samples(2, 0))["collated_local_crops"].numel() == 0


def test_augmentation_output_collates_for_the_fashion_mnist_preset() -> None:
    augment = DataAugmentationDINO(fashion_mnist_config())
    grey = torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    samples = [(augment(grey, generator_seed=i), 0) for i in range(4)]
    out = collate_data_and_cast(samples, n_tokens=49, mask_generator=MaskingGenerator(7, max_num_patches=24),
                                rng=random.Random(0))
    assert out["collated_global_crops"].shape == (8, 3, 28, 28)
    assert out["collated_local_crops"].shape == (32, 3, 12, 12)
    assert torch.equal(out["collated_global_crops"][1], samples[1][0]["global_crops"][0])
    assert torch.equal(out["collated_global_crops"][4 + 1], samples[1][0]["global_crops"][1])
    assert int((out["collated_masks"].sum(1) > 0).sum()) == 4
