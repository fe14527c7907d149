"""GPU throughput of one full DINOv2 training step (objective + AdamW + EMA) for ViT-S/14 and ViT-L/14
at 224/98 px crops in bf16: images/s, peak memory and MFU (against the GPU's dense bf16 peak), packed vs
per-crop attention batching, SDPA vs xformers (when installed), and the FSDP2-sharded model on one GPU
(a one-process NCCL group: the sharding wrappers' own overhead).

    python benchmarks/pretrain_gpu.py --time-limit 420 --out benchmarks/results/pretrain_gpu.json

Needs a CUDA device; exits with a message otherwise. Not run in CI (no GPU there). The JSON is rewritten
after every row, so a run cut off by its time limit keeps what it measured; rows not reached are listed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from components.models import BackboneConfig
from components.ssl.config import HeadConfig, ObjectiveConfig
from components.ssl.meta_arch import SSLMetaArch
from components.storage.atomic import write_text_atomic
from components.train.parallel import shard_meta_arch
from components.train.tracking import flops_per_image, peak_flops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packed_forward import Case, synthetic_batch

CASES = {
    "vits14": Case("ViT-S/14", "vit_small", 14, 224, 98, 8, 64, 65536, 2048, 256),
    "vitl14": Case("ViT-L/14", "vit_large", 14, 224, 98, 8, 32, 65536, 2048, 256),
}


def one_process_group() -> None:
    """A world of one (NCCL), which FSDP2's device mesh needs even on a single GPU."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl", rank=0, world_size=1)


def step_time(case: Case, packed: bool, backend: str, steps: int, warmup: int, fsdp: bool = False
              ) -> dict[str, float]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    objective = ObjectiveConfig(precision="bf16", packed_forward=packed)
    objective.dino.head = objective.ibot.head = HeadConfig(case.prototypes, case.head_hidden, case.bottleneck)
    backbone = BackboneConfig(arch=case.arch, patch_size=case.patch, img_size=case.global_px,
                              drop_path_rate=0.3, attn_backend=backend)  # type: ignore[arg-type]
    model = SSLMetaArch(backbone, objective).to(device).train()
    if fsdp:
        one_process_group()
        shard_meta_arch(model, torch.bfloat16, torch.float32)
    optimizer = torch.optim.AdamW(model.param_groups(), lr=1e-4)
    batch = {k: v.to(device) for k, v in synthetic_batch(case, seed=0).items() if isinstance(v, torch.Tensor)}
    torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=0.07)
        model.clip_gradients(3.0)
        optimizer.step()
        model.update_teacher(0.994)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    images_per_second = case.images / seconds
    flops = flops_per_image(model, case.global_px, case.local_px, case.n_local, device)
    peak = peak_flops(device)
    return {"seconds_per_step": round(seconds, 4), "images_per_second": round(images_per_second, 1),
            "mfu": round(images_per_second * flops / peak, 4) if peak else -1.0,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def write_json_atomically(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(payload, indent=2) + "\n", path)


def plan(cases: list[str], backends: list[str]) -> list[dict[str, Any]]:
    """Every row to measure, cheapest first within a case so a time limit cuts the expensive ones."""
    rows = []
    for name in cases:
        for backend in backends:
            for packed in (True, False):
                rows.append({"case": name, "backend": backend, "packed": packed, "fsdp": False})
        rows.append({"case": name, "backend": "sdpa", "packed": True, "fsdp": True})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=420.0,
                        help="seconds; no new row starts after this (the JSON keeps every finished row)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pretrain_gpu.py needs a CUDA device")
    started = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = True
    backends = ["sdpa"] + (["xformers"] if importlib.util.find_spec("xformers") else [])
    report: dict[str, Any] = {"benchmark": "pretrain_gpu", "device": torch.cuda.get_device_name(),
                              "torch": torch.__version__, "python": platform.python_version(), "precision": "bf16",
                              "xformers_installed": "xformers" in backends, "time_limit_s": args.time_limit,
                              "results": [], "not_reached": []}
    for row in plan(args.cases, backends):
        if time.perf_counter() - started > args.time_limit:
            report["not_reached"].append(row)
            continue
        case = CASES[row["case"]]
        try:
            measured: dict[str, Any] = step_time(case, row["packed"], row["backend"], args.steps, args.warmup,
                                                 row["fsdp"])
        except torch.OutOfMemoryError as error:
            measured = {"error": f"out of memory: {str(error).splitlines()[0]}"}
        result = {**row, "case": case.name, "images_per_step": case.images, **measured}
        print(json.dumps(result), flush=True)
        report["results"].append(result)
        report["wall_seconds"] = round(time.perf_counter() - started, 1)
        write_json_atomically(args.out, report)
        torch.cuda.empty_cache()
    write_json_atomically(args.out, report)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
