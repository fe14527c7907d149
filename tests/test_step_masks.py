"""iBOT masks per training step: different on every rank, the same for the same samples on any world size
(a one-process run over the concatenated rank batches draws them all), and a rank without any masked token
neither hangs nor skews the others (two gloo processes)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from components.config import from_mapping, to_mapping
from components.data.batched_multicrop import BatchedCrops
from components.data.masking import MaskingGenerator
from components.data.step_masks import mask_plan, plan_generator, rank_offsets, step_masks
from components.train import engine
from components.train.config import PretrainConfig
from components.train.distributed import init_distributed, shutdown_distributed
from components.train.engine import collate_step, run_pretraining
from tests.test_pretrain_distributed import free_port
from tests.test_pretrain_engine import tiny_config, write_pool

GRID, RATIOS, PROBABILITY, SEED = 7, (0.1, 0.5), 0.5, 11


def masks_for(offsets: list[int], global_batch: int, step: int = 3) -> list[torch.Tensor]:
    masks, _ = step_masks(offsets, global_batch, GRID * GRID, RATIOS, PROBABILITY,
                          MaskingGenerator(GRID, max_num_patches=0.5 * GRID * GRID), SEED, step)
    return masks


def by_slot(masks: list[torch.Tensor], offsets: list[int], global_batch: int) -> dict[int, torch.Tensor]:
    """Crop-major masks of the samples at ``offsets`` keyed by global slot (crop * G + offset)."""
    n = len(offsets)
    return {crop * global_batch + o: masks[crop * n + k] for crop in range(2) for k, o in enumerate(offsets)}


@pytest.mark.parametrize("world_size", [2, 4])
def test_ranks_together_draw_the_one_process_masks(world_size: int) -> None:
    global_batch = 8
    single = by_slot(masks_for(list(range(global_batch)), global_batch), list(range(global_batch)), global_batch)
    per_rank = [masks_for(rank_offsets(r, world_size, global_batch // world_size), global_batch)
                for r in range(world_size)]
    gathered: dict[int, torch.Tensor] = {}
    for rank, masks in enumerate(per_rank):
        gathered.update(by_slot(masks, rank_offsets(rank, world_size, global_batch // world_size), global_batch))
    assert gathered.keys() == single.keys()
    for slot, mask in single.items():
        assert torch.equal(gathered[slot], mask), slot
    # The ranks' own batches differ (the official per-rank loaders draw different masks too).
    assert any(not torch.equal(a, b) for a, b in zip(per_rank[0], per_rank[1], strict=True))


def test_the_plan_is_the_official_stratification_over_the_global_batch() -> None:
    plan = mask_plan(16, RATIOS, PROBABILITY, plan_generator(SEED, 0))
    bins = sorted(b for b in plan if b is not None)
    assert len(bins) == 8 and plan.count(None) == 8
    edges = torch.linspace(0.1, 0.5, 9, dtype=torch.float32).tolist()
    assert bins == [(pytest.approx(edges[i]), pytest.approx(edges[i + 1])) for i in range(8)]
    masks = masks_for(list(range(8)), 8)
    sizes = sorted(int(m.sum()) for m in masks)
    assert sizes[:8] == [0] * 8 and all(s > 0 for s in sizes[8:])


def test_masks_change_with_the_step_and_repeat_for_the_same_step() -> None:
    offsets = list(range(4))
    assert all(torch.equal(a, b) for a, b in zip(masks_for(offsets, 4, 5), masks_for(offsets, 4, 5), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(masks_for(offsets, 4, 5), masks_for(offsets, 4, 6), strict=True))


def test_collate_step_uses_the_rank_and_world_size(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "unused.parquet", tmp_path / "run")
    cfg.data.batch_size_per_rank = 2
    size = cfg.crops.global_crops_size
    crops = BatchedCrops(torch.zeros(4, 3, size, size), torch.zeros(0))
    grid = size // cfg.backbone.patch_size
    rank_masks = [collate_step(cfg, crops, 2, torch.device("cpu"), rank, 2)["collated_masks"] for rank in (0, 1)]
    expected = masks_for_config(cfg, [0, 2], 4, 2), masks_for_config(cfg, [1, 3], 4, 2)
    for got, want in zip(rank_masks, expected, strict=True):
        assert torch.equal(got, torch.stack(want).flatten(1)) and got.shape == (4, grid * grid)


def masks_for_config(cfg: PretrainConfig, offsets: list[int], global_batch: int, step: int) -> list[torch.Tensor]:
    grid = cfg.crops.global_crops_size // cfg.backbone.patch_size
    ibot = cfg.objective.ibot
    masks, _ = step_masks(offsets, global_batch, grid * grid, ibot.mask_ratio_min_max, ibot.mask_sample_probability,
                          MaskingGenerator(grid, max_num_patches=0.5 * grid * grid), cfg.data.seed, step)
    return masks


def worker(rank: int, world: int, port: int, cfg_map: dict[str, object], root: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    masks: list[torch.Tensor] = []
    original = engine.collate_step

    def recording(*args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        batch = original(*args, **kwargs)
        masks.append(batch["collated_masks"].clone())
        return batch

    engine.collate_step = recording  # type: ignore[assignment]  # a spawned process of its own
    try:
        result, model = run_pretraining(from_mapping(PretrainConfig, cfg_map), env, Path(root))
        torch.save({"end": result.end_step, "losses": result.last_losses, "masks": masks,
                    "student": {k: v.detach().clone() for k, v in model.student.state_dict().items()},
                    "centers": {k: v.clone() for k, v in model.state_dict().items() if k.endswith("center")}},
                   Path(out) / f"rank{rank}.pt")
    finally:
        shutdown_distributed()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_a_rank_without_masked_tokens_does_not_hang(tmp_path: Path, centering: str) -> None:
    """Global batch 2 and mask probability 0.25: one of the 4 global crops is masked, so every step one rank
    has no masked token. Both ranks finish with the same weights and centers."""
    manifest = write_pool(tmp_path, n=8, corrupt=False)
    cfg = tiny_config(manifest, tmp_path / "run", iterations=3)
    cfg.data.batch_size_per_rank = 1
    cfg.objective.ibot.mask_sample_probability = 0.25
    cfg.objective.teacher.centering = centering  # type: ignore[assignment]
    out = tmp_path / "out"
    out.mkdir()
    mp.spawn(worker, args=(2, free_port(), to_mapping(cfg), str(tmp_path), str(out)), nprocs=2, join=True)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["end"] for r in ranks] == [3, 3]
    for part in ("student", "centers"):
        for key, value in ranks[0][part].items():
            torch.testing.assert_close(ranks[1][part][key], value, rtol=0, atol=0, msg=key)
    for r in ranks:
        assert all(v == v for v in r["losses"].values())  # finite
    # Each step: the ranks' masks differ, and together they are a one-process run's over both samples.
    for step in range(3):
        per_rank = [r["masks"][step] for r in ranks]  # (2, n_tokens) each: crop 0 and crop 1 of one sample
        assert not torch.equal(per_rank[0], per_rank[1])
        assert sum(int(m.any(dim=1).sum()) for m in per_rank) == 1  # one masked crop in the global batch
        single = torch.stack(masks_for_config(cfg, [0, 1], 2, step)).flatten(1)  # (4, n_tokens) crop-major
        for rank, mask in enumerate(per_rank):
            torch.testing.assert_close(mask, single[[rank, 2 + rank]], rtol=0, atol=0)
