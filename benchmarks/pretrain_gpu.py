"""GPU throughput of one full DINOv2 training step (objective + AdamW + EMA) for ViT-S/14 and ViT-L/14
at 224/98 px crops in bf16: images/s and MFU, packed vs per-crop attention batching, SDPA vs xformers
(when xformers is installed).

    python benchmarks/pretrain_gpu.py --out benchmarks/results/pretrain_gpu.json

Needs a CUDA device; exits with a message otherwise. Not run in CI (no GPU there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

from components.models import BackboneConfig
from components.ssl.config import HeadConfig, ObjectiveConfig
from components.ssl.meta_arch import SSLMetaArch
from components.train.tracking import flops_per_image, peak_flops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from packed_forward import Case, synthetic_batch

CASES = {
    "vits14": Case("ViT-S/14", "vit_small", 14, 224, 98, 8, 64, 65536, 2048, 256),
    "vitl14": Case("ViT-L/14", "vit_large", 14, 224, 98, 8, 32, 65536, 2048, 256),
}


def step_time(case: Case, packed: bool, backend: str, steps: int, warmup: int) -> dict[str, float]:
    device = torch.device("cuda")
    torch.manual_seed(0)
    objective = ObjectiveConfig(precision="bf16", packed_forward=packed)
    objective.dino.head = objective.ibot.head = HeadConfig(case.prototypes, case.head_hidden, case.bottleneck)
    backbone = BackboneConfig(arch=case.arch, patch_size=case.patch, img_size=case.global_px,
                              drop_path_rate=0.3, attn_backend=backend)  # type: ignore[arg-type]
    model = SSLMetaArch(backbone, objective).to(device).train()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/pretrain_gpu.json"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pretrain_gpu.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = True
    backends = ["sdpa"] + (["xformers"] if importlib.util.find_spec("xformers") else [])
    results = []
    for name in args.cases:
        for backend in backends:
            for packed in (True, False):
                row = {"case": CASES[name].name, "images_per_step": CASES[name].images, "backend": backend,
                       "packed": packed, **step_time(CASES[name], packed, backend, args.steps, args.warmup)}
                print(json.dumps(row), flush=True)
                results.append(row)
                torch.cuda.empty_cache()
    report = {"benchmark": "pretrain_gpu", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "precision": "bf16", "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
