"""Forward+backward time of one DINOv2 training step, packed (all crops as one variable-length batch)
versus per-crop (one backbone call per crop size), for a tiny CPU config and ViT-S/14.

    .venv/bin/python benchmarks/packed_forward.py --out benchmarks/results/packed_forward.json

Writes medians over repeats and the per-crop / packed ratio (> 1 means packed is faster).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from components.data.collate import collate_data_and_cast
from components.data.masking import MaskingGenerator
from components.models import BackboneConfig
from components.ssl.config import HeadConfig, ObjectiveConfig
from components.ssl.meta_arch import SSLMetaArch


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    patch: int
    global_px: int
    local_px: int
    n_local: int
    images: int
    prototypes: int
    head_hidden: int
    bottleneck: int


CASES = {
    "tiny": Case("tiny (vit_pico/4, 28+12 px)", "vit_pico", 4, 28, 12, 8, 32, 1024, 512, 128),
    "vits14": Case("ViT-S/14 (224+98 px)", "vit_small", 14, 224, 98, 8, 2, 65536, 2048, 256),
}


def synthetic_batch(case: Case, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    samples = [{"global_crops": [torch.randn(3, case.global_px, case.global_px, generator=g) for _ in range(2)],
                "local_crops": [torch.randn(3, case.local_px, case.local_px, generator=g) for _ in range(case.n_local)]}
               for _ in range(case.images)]
    grid = case.global_px // case.patch
    masker = MaskingGenerator(grid, max_num_patches=0.5 * grid * grid)
    return dict(collate_data_and_cast(samples, (0.1, 0.5), 0.5, n_tokens=grid * grid, mask_generator=masker,
                                      rng=random.Random(seed)))  # type: ignore[arg-type]


def time_step(model: SSLMetaArch, batch: dict[str, torch.Tensor], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats + 1):  # the first call warms up allocators and caches
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        model.forward_backward(batch, teacher_temp=0.07)
        times.append(time.perf_counter() - start)
    return times[1:]


def run_case(case: Case, repeats: int, precision: str) -> dict[str, object]:
    head = HeadConfig(n_prototypes=case.prototypes, hidden_dim=case.head_hidden, bottleneck_dim=case.bottleneck)
    backbone = BackboneConfig(arch=case.arch, patch_size=case.patch, img_size=case.global_px, drop_path_rate=0.0)
    batch = synthetic_batch(case, seed=0)
    medians = {}
    for packed in (True, False):
        torch.manual_seed(0)
        objective = ObjectiveConfig(precision=precision, packed_forward=packed)  # type: ignore[arg-type]
        objective.dino.head = objective.ibot.head = head
        model = SSLMetaArch(backbone, objective).train()
        medians["packed" if packed else "per_crop"] = statistics.median(time_step(model, batch, repeats))
    return {
        "case": case.name, "images_per_step": case.images, "crops_per_image": 2 + case.n_local,
        "precision": precision, "repeats": repeats,
        "packed_seconds": round(medians["packed"], 4), "per_crop_seconds": round(medians["per_crop"], 4),
        "per_crop_over_packed": round(medians["per_crop"] / medians["packed"], 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/packed_forward.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run_case(CASES[name], args.repeats, args.precision) for name in args.cases]
    report = {"benchmark": "packed_forward", "device": "cpu", "threads": args.threads, "torch": torch.__version__,
              "python": platform.python_version(), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
