"""The SSL teachers under torch.distributed (2 processes, gloo, CPU) equal one process on the whole batch.

The parent computes every expected value without a process group; each spawned rank then runs the
distributed code on its own shard and compares with its slice of the expected value. An assertion
failing in a rank is re-raised here by ``torch.multiprocessing.spawn``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from components.ssl import DINOLoss, iBOTPatchLoss, sinkhorn_knopp

WORLD_SIZE = 2
DINO_ROWS_PER_RANK = 4
IBOT_ROWS = (3, 5)  # masked tokens on rank 0 and rank 1: uneven, as in real iBOT batches
K = 6
TEMP = 0.07


def shard(full: torch.Tensor, sizes: tuple[int, ...], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return full[start:start + sizes[rank]]


def make_case() -> dict[str, Any]:
    """Inputs and single-process expectations, all computed without a process group."""
    gen = torch.Generator().manual_seed(7)
    dino_sizes = (DINO_ROWS_PER_RANK,) * WORLD_SIZE
    dino_logits = torch.randn(sum(dino_sizes), K, generator=gen)
    ibot_logits = torch.randn(sum(IBOT_ROWS), K, generator=gen)
    steps = [torch.randn(sum(dino_sizes), K, generator=gen) for _ in range(2)]  # two center updates

    expected_center = torch.zeros(1, K)
    for batch in steps:  # the official EMA on the global batch mean
        expected_center = 0.9 * expected_center + 0.1 * batch.mean(0, keepdim=True)
    # iBOT: per-process token means averaged over processes (the official formula)
    ibot_shard_means = [shard(ibot_logits, IBOT_ROWS, r).mean(0) for r in range(WORLD_SIZE)]
    expected_ibot_center = (0.1 * torch.stack(ibot_shard_means).mean(0)).view(1, 1, K)

    return {
        "dino_sizes": dino_sizes,
        "dino_logits": dino_logits,
        "dino_expected": sinkhorn_knopp(dino_logits, TEMP),
        "ibot_logits": ibot_logits,
        "ibot_expected": sinkhorn_knopp(ibot_logits, TEMP, n_samples=sum(IBOT_ROWS)),
        "center_steps": steps,
        "expected_center": expected_center,
        "expected_ibot_center": expected_ibot_center,
    }


def run_rank(rank: int, init_file: str, case: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        check_sinkhorn(rank, case)
        check_centering(rank, case)
    finally:
        dist.destroy_process_group()


def check_sinkhorn(rank: int, case: dict[str, Any]) -> None:
    sizes = case["dino_sizes"]
    dino = DINOLoss(K).sinkhorn_knopp_teacher(shard(case["dino_logits"], sizes, rank), TEMP)
    torch.testing.assert_close(dino, shard(case["dino_expected"], sizes, rank), rtol=1e-5, atol=1e-7)

    # iBOT: each rank passes its own number of masked tokens; the global count is their sum.
    count = torch.tensor([IBOT_ROWS[rank]])
    ibot = iBOTPatchLoss(K).sinkhorn_knopp_teacher(shard(case["ibot_logits"], IBOT_ROWS, rank), TEMP, count)
    torch.testing.assert_close(ibot, shard(case["ibot_expected"], IBOT_ROWS, rank), rtol=1e-5, atol=1e-7)
    assert count.tolist() == [IBOT_ROWS[rank]], "the caller's count must not be all-reduced in place"
    # None counts this process's rows, summed over processes: the same targets
    by_rows = iBOTPatchLoss(K).sinkhorn_knopp_teacher(shard(case["ibot_logits"], IBOT_ROWS, rank), TEMP)
    torch.testing.assert_close(by_rows, ibot)


def check_centering(rank: int, case: dict[str, Any]) -> None:
    loss = DINOLoss(K)
    for batch in case["center_steps"]:
        loss.softmax_center_teacher(shard(batch, case["dino_sizes"], rank), TEMP)  # applies the pending update
        loss.update_center(shard(batch, case["dino_sizes"], rank))  # asynchronous all-reduce
    loss.apply_center_update()
    torch.testing.assert_close(loss.center, case["expected_center"], rtol=1e-5, atol=1e-7)

    ibot = iBOTPatchLoss(K)
    tokens = shard(case["ibot_logits"], IBOT_ROWS, rank)
    ibot.update_center(tokens.unsqueeze(0))  # the official (1, M, K) layout
    ibot.apply_center_update()
    torch.testing.assert_close(ibot.center, case["expected_ibot_center"], rtol=1e-5, atol=1e-7)


def test_distributed_teachers_equal_single_process_on_the_concatenated_batch(tmp_path: Path) -> None:
    assert not dist.is_initialized()  # the expectations below must be single-process
    case = make_case()
    # Sanity of the fixture: a rank-local Sinkhorn differs, so the comparison can fail.
    local_only = sinkhorn_knopp(shard(case["dino_logits"], case["dino_sizes"], 0), TEMP)
    assert not torch.allclose(local_only, shard(case["dino_expected"], case["dino_sizes"], 0), atol=1e-4)
    mp.spawn(run_rank, args=(str(tmp_path / "rendezvous"), case), nprocs=WORLD_SIZE, join=True)
