"""Pretraining with 2 gloo processes, and resume across world sizes (2 -> 1, 1 -> 2)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from components.config import from_mapping, to_mapping
from components.train.config import PretrainConfig
from components.train.distributed import DistEnv, init_distributed, shutdown_distributed
from components.train.engine import run_pretraining
from tests.test_pretrain_engine import tiny_config, write_pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker(rank: int, world: int, port: int, cfg_map: dict[str, object], root: str, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        result, model = run_pretraining(from_mapping(PretrainConfig, cfg_map), env, Path(root))
        torch.save({"start": result.start_step, "end": result.end_step,
                    "student": {k: v.detach().clone() for k, v in model.student.state_dict().items()}},
                   Path(out) / f"rank{rank}.pt")
    finally:
        shutdown_distributed()


def run_two(cfg: PretrainConfig, root: Path, out: Path) -> list[dict[str, object]]:
    out.mkdir(parents=True, exist_ok=True)
    mp.spawn(worker, args=(2, free_port(), to_mapping(cfg), str(root), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.slow
def test_two_processes_stay_in_sync_then_resume_on_one(tmp_path: Path) -> None:
    manifest = write_pool(tmp_path, corrupt=False)
    cfg = tiny_config(manifest, tmp_path / "run", iterations=6, max_steps=4)
    cfg.data.batch_size_per_rank = 2  # global batch 4, the same as the single process below
    ranks = run_two(cfg, tmp_path, tmp_path / "two")
    assert [r["end"] for r in ranks] == [4, 4]
    for key, value in ranks[0]["student"].items():  # type: ignore[union-attr]
        torch.testing.assert_close(ranks[1]["student"][key], value, rtol=0, atol=0, msg=key)  # type: ignore[index]
    single = tiny_config(manifest, tmp_path / "run", iterations=6)
    result, _ = run_pretraining(single, CPU, tmp_path)
    assert result.start_step == 4 and result.finished


@pytest.mark.slow
def test_one_process_then_resume_on_two(tmp_path: Path) -> None:
    manifest = write_pool(tmp_path, corrupt=False)
    first, _ = run_pretraining(tiny_config(manifest, tmp_path / "run", iterations=6, max_steps=2), CPU, tmp_path)
    assert first.end_step == 2
    cfg = tiny_config(manifest, tmp_path / "run", iterations=6)
    cfg.data.batch_size_per_rank = 2
    ranks = run_two(cfg, tmp_path, tmp_path / "two")
    assert [(r["start"], r["end"]) for r in ranks] == [(2, 6), (2, 6)]
