"""FSDP2 strategy on 2 gloo processes: equals the all-reduce strategy, and its checkpoint resumes on 1 process."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TypedDict

import pytest
import torch
import torch.multiprocessing as mp

from components.config import from_mapping, to_mapping
from components.train.config import PretrainConfig
from components.train.distributed import DistEnv, init_distributed, shutdown_distributed
from components.train.engine import run_pretraining
from components.train.parallel import full_state_dict, is_sharded
from tests.test_pretrain_distributed import free_port
from tests.test_pretrain_engine import tiny_config, write_pool


class RunRecord(TypedDict):
    end: int
    losses: dict[str, float]
    sharded: bool
    teacher_frozen: bool
    student: dict[str, torch.Tensor]  # gathered full tensors
    teacher: dict[str, torch.Tensor]  # the EMA teacher (backbone and heads), gathered
    centers: dict[str, torch.Tensor]  # DINO and iBOT centers (replicated buffers)
    grad_norms: list[dict[str, float]]  # per step, per student module (what clip_gradients measured)


class GradNormTracker:
    """Keeps the logged gradient norms; under FSDP they must be the global norms, not a shard's."""

    def __init__(self) -> None:
        self.norms: list[dict[str, float]] = []

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self.norms.append({k: v for k, v in metrics.items() if k.startswith("grad_norm_")})

    def close(self) -> None:
        return None


CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def worker(rank: int, world: int, port: int, cfg_maps: dict[str, dict[str, object]], root: str, out: str) -> None:
    """Run every named config in turn in one process group (one spawn: the imports dominate the test time)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    env = init_distributed("cpu")
    try:
        for name, cfg_map in cfg_maps.items():
            tracker = GradNormTracker()
            result, model = run_pretraining(from_mapping(PretrainConfig, cfg_map), env, Path(root), tracker)
            student = full_state_dict(model.student)  # a collective under FSDP: every rank gathers
            teacher = full_state_dict(model.teacher)
            centers = {name: loss.center.detach().clone()
                       for name, loss in (("dino", model.dino_loss), ("ibot", model.ibot_patch_loss))}
            record: RunRecord = {
                "end": result.end_step, "losses": result.last_losses, "sharded": is_sharded(model.student),
                "teacher_frozen": not any(p.requires_grad for p in model.teacher.parameters()), "student": student,
                "teacher": teacher, "centers": centers, "grad_norms": tracker.norms,
            }
            torch.save(record, Path(out) / f"{name}_rank{rank}.pt")
    finally:
        shutdown_distributed()


def run_two(cfgs: dict[str, PretrainConfig], root: Path, out: Path) -> dict[str, list[RunRecord]]:
    out.mkdir(parents=True, exist_ok=True)
    maps = {name: to_mapping(cfg) for name, cfg in cfgs.items()}
    mp.spawn(worker, args=(2, free_port(), maps, str(root), str(out)), nprocs=2, join=True)
    return {name: [torch.load(out / f"{name}_rank{r}.pt", weights_only=True) for r in range(2)] for name in cfgs}


def config(manifest: Path, output: Path, strategy: str, centering: str = "sinkhorn_knopp",
           **run: object) -> PretrainConfig:
    cfg = tiny_config(manifest, output, iterations=4, **run)
    cfg.objective.teacher.centering = centering  # type: ignore[assignment]
    cfg.data.batch_size_per_rank = 2
    cfg.checkpoint.every = 3  # one checkpoint, at the end of the 2-process runs
    cfg.parallel.strategy = strategy  # type: ignore[assignment]
    cfg.objective.optim.clip_grad = 0.05  # below the measured norms, so clipping is active
    cfg.parallel.fsdp_param_dtype = "fp32"  # bf16 on CPU/gloo is slow and not comparable at fp32 tolerance
    return cfg


@pytest.mark.slow
def test_fsdp_equals_all_reduce_and_resumes_on_one_process(tmp_path: Path) -> None:
    manifest = write_pool(tmp_path, corrupt=False)
    tick = time.perf_counter()
    configs = {strategy: config(manifest, tmp_path / strategy, strategy, max_steps=3) for strategy in ("fsdp", "ddp")}
    # EMA centering too, so the center buffers carry state worth comparing (Sinkhorn-Knopp leaves them at 0).
    configs.update({f"{strategy}_centering": config(manifest, tmp_path / f"{strategy}_centering", strategy,
                                                    "centering", max_steps=3) for strategy in ("fsdp", "ddp")})
    runs = run_two(configs, tmp_path, tmp_path / "out")
    fsdp, ddp = runs["fsdp"], runs["ddp"]
    print(f"2-process fsdp and ddp runs: {time.perf_counter() - tick:.1f} s")
    assert [r["end"] for r in fsdp] == [3, 3] and all(r["sharded"] and r["teacher_frozen"] for r in fsdp)
    assert not ddp[0]["sharded"]
    for losses in (fsdp[0]["losses"], ddp[0]["losses"]):
        assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    print("grad norms fsdp", fsdp[0]["grad_norms"], "ddp", ddp[0]["grad_norms"])
    assert len(fsdp[0]["grad_norms"]) == 3 and all(fsdp[0]["grad_norms"])
    for f_step, d_step in zip(fsdp[0]["grad_norms"], ddp[0]["grad_norms"], strict=True):
        assert f_step.keys() == d_step.keys()
        for key in d_step:
            assert abs(f_step[key] - d_step[key]) <= 1e-4 * d_step[key] and d_step[key] > 0.05, key
    for f_run, d_run in ((fsdp, ddp), (runs["fsdp_centering"], runs["ddp_centering"])):
        for part in ("student", "teacher", "centers"):
            expected, got = d_run[0][part], f_run[0][part]  # type: ignore[literal-required]
            assert expected.keys() == got.keys() and expected, part
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-5, msg=f"{part} {key}")
                torch.testing.assert_close(f_run[1][part][key], got[key], rtol=0, atol=0,  # type: ignore[literal-required]
                                           msg=f"{part} {key}")
    centers = runs["ddp_centering"][0]["centers"]
    assert all(float(c.abs().max()) > 0 for c in centers.values())  # the EMA center moved
    # The FSDP run's sharded DCP checkpoint (step 3) resumes in one plain process.
    result, model = run_pretraining(config(manifest, tmp_path / "fsdp", "ddp"), CPU, tmp_path)
    assert result.start_step == 3 and result.finished and not is_sharded(model)
    assert all(torch.isfinite(torch.tensor(v)) for v in result.last_losses.values())
