"""Pretraining throughput of the CPU preset (params/pretrain.yaml) on the demo pool: 1 vs 2 processes.

    .venv/bin/python benchmarks/pretrain_cpu.py --steps 30 --out benchmarks/results/pretrain_cpu.json

Each configuration trains from scratch into a temporary folder; the first `--warmup` steps are left
out of the timing (data loader start, allocator warm-up). Needs the demo pool (`dinoflow data`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.multiprocessing as mp

from components.config import from_mapping, to_mapping
from components.train.config import PretrainConfig, load_pretrain_config
from components.train.distributed import init_distributed, shutdown_distributed
from components.train.engine import run_pretraining


class TimingTracker:
    """Records the wall time at every logged step (log_every = 1)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self.times.append(time.perf_counter())

    def close(self) -> None:
        return None


def measure(cfg_map: dict[str, object], root: str, warmup: int) -> dict[str, float]:
    cfg = from_mapping(PretrainConfig, cfg_map)
    env = init_distributed("cpu")
    tracker = TimingTracker()
    try:
        run_pretraining(cfg, env, Path(root), tracker if env.is_main else None)
    finally:
        shutdown_distributed()
    if not env.is_main:
        return {}
    timed = tracker.times[warmup:]
    steps = len(timed) - 1
    seconds = timed[-1] - timed[0]
    global_batch = cfg.data.batch_size_per_rank * env.world_size
    return {"steps_per_second": steps / seconds, "images_per_second": steps * global_batch / seconds}


def worker(rank: int, world: int, port: int, cfg_map: dict[str, object], root: str, warmup: int, out: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    result = measure(cfg_map, root, warmup)
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(world: int, cfg: PretrainConfig, warmup: int, root: Path) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        run_cfg = dataclasses.replace(
            cfg, run=dataclasses.replace(cfg.run, output_dir=str(Path(scratch) / "out"), log_every=1),
            checkpoint=dataclasses.replace(cfg.checkpoint, every=10**9))
        out = Path(scratch) / "result.json"
        mp.spawn(worker, args=(world, free_port(), to_mapping(run_cfg), str(root), warmup, str(out)),
                 nprocs=world, join=True)
        return dict(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params/pretrain.yaml")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_cpu.json"))
    args = parser.parse_args()
    root = Path.cwd()
    cfg = load_pretrain_config(args.params)
    cfg.objective.optim.iterations = args.steps + args.warmup
    cfg.objective.optim.warmup_iters = 1
    cfg.objective.optim.freeze_last_layer_iters = 1
    results = []
    for world in (1, 2):
        cfg.data.batch_size_per_rank = args.global_batch // world
        cfg.data.num_workers = 1
        results.append({"processes": world, "batch_size_per_rank": cfg.data.batch_size_per_rank,
                        **{k: round(v, 3) for k, v in run(world, cfg, args.warmup, root).items()}})
    report = {"benchmark": "pretrain_cpu", "preset": args.params, "global_batch": args.global_batch,
              "timed_steps": args.steps, "cpu_count": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
