"""A short CPU run of the full DINOv2 objective on real images (Fashion-MNIST), to check that the
recipe learns and does not collapse: total loss, teacher target entropy and the std of normalised
CLS features are recorded every few steps, and a k-NN probe on held-out images before and after.

    .venv/bin/python benchmarks/recipe_cpu_run.py --steps 200 --out benchmarks/results/recipe_cpu_run.json

This is not a timed test: it writes its measurements as JSON for people to read.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from components.data import fashion_mnist
from components.data.collate import collate_data_and_cast
from components.data.masking import MaskingGenerator
from components.data.multicrop import DataAugmentationDINO, MultiCropConfig
from components.models import BackboneConfig
from components.ssl.config import HeadConfig, ObjectiveConfig
from components.ssl.meta_arch import SSLMetaArch
from components.ssl.monitoring import mean_entropy, normalized_feature_std
from components.ssl.param_groups import apply_schedules
from components.ssl.schedules import build_schedules, scaled_lr


class MultiCropImages(Dataset[dict[str, Any]]):
    def __init__(self, images: np.ndarray, augment: DataAugmentationDINO, seed: int) -> None:
        self.images, self.augment, self.seed = images, augment, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return dict(self.augment(Image.fromarray(self.images[index]), generator_seed=self.seed * 1_000_003 + index))


@torch.no_grad()
def knn_top1(backbone: torch.nn.Module, train: np.ndarray, train_y: np.ndarray, test: np.ndarray,
             test_y: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...], k: int = 20) -> float:
    """Cosine k-NN (T=0.07 weighted votes, as DINO) on the backbone's CLS features."""
    def embed(x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(x).float().div(255).unsqueeze(1).expand(-1, 3, -1, -1)
        t = (t - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        feats = [backbone.forward_features(chunk)["x_norm_clstoken"] for chunk in t.split(512)]
        return torch.nn.functional.normalize(torch.cat(feats), dim=-1)

    backbone.eval()
    ref, qry = embed(train), embed(test)
    sims, idx = (qry @ ref.T).topk(k, dim=1)
    votes = torch.zeros(len(test), 10).scatter_add_(1, torch.from_numpy(train_y).long()[idx], (sims / 0.07).exp())
    return float((votes.argmax(1).numpy() == test_y).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--local-crops", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/recipe_cpu_run.json"))
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    folder = fashion_mnist.locate(fashion_mnist.INSTALLED_DATA_DIR, Path(".dinoflow/cache/fashion-mnist"))
    train = fashion_mnist.load_split(folder, "train")
    test = fashion_mnist.load_split(folder, "test")
    crops = MultiCropConfig(global_crops_size=28, local_crops_size=12, local_crops_number=args.local_crops)
    backbone = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28, layerscale_init=0.1, drop_path_rate=0.0)
    head = HeadConfig(n_prototypes=1024, hidden_dim=512, bottleneck_dim=128)
    objective = ObjectiveConfig(precision="fp32")
    objective.dino.head = head
    objective.ibot.head = head
    o = objective.optim
    o.iterations, o.warmup_iters, o.freeze_last_layer_iters = args.steps, args.steps // 10, args.steps // 20
    o.base_lr = 0.004
    objective.teacher.warmup_teacher_temp_iters = args.steps * 3 // 10
    model = SSLMetaArch(backbone, objective).train()

    grid = 28 // 4
    masker = MaskingGenerator(grid, max_num_patches=0.5 * grid * grid)
    rng = random.Random(args.seed)
    augment = DataAugmentationDINO(crops)
    pool = train.images[:20_000]
    loader = DataLoader(
        MultiCropImages(pool, augment, args.seed), batch_size=args.batch_size, shuffle=True, drop_last=True,
        num_workers=0, generator=torch.Generator().manual_seed(args.seed),
        collate_fn=lambda samples: collate_data_and_cast(
            samples, objective.ibot.mask_ratio_min_max, objective.ibot.mask_sample_probability,
            n_tokens=grid * grid, mask_generator=masker, rng=rng),
    )
    lr = scaled_lr(o.base_lr, args.batch_size, o.scaling_rule)
    t = objective.teacher
    schedules = build_schedules(
        total_iters=o.iterations, lr=lr, min_lr=o.min_lr, warmup_iters=o.warmup_iters,
        weight_decay=o.weight_decay, weight_decay_end=o.weight_decay_end, momentum_teacher=t.momentum_teacher,
        final_momentum_teacher=t.final_momentum_teacher, teacher_temp=t.teacher_temp,
        warmup_teacher_temp=t.warmup_teacher_temp, warmup_teacher_temp_iters=t.warmup_teacher_temp_iters,
        freeze_last_layer_iters=o.freeze_last_layer_iters)
    optimizer = torch.optim.AdamW(model.param_groups(), betas=(o.adamw_beta1, o.adamw_beta2))

    probe = (train.images[:5000], train.labels[:5000], test.images[:1000], test.labels[:1000],
             crops.normalize_mean, crops.normalize_std)
    knn_before = knn_top1(model.teacher["backbone"], *probe)
    model.train()
    history: list[dict[str, float]] = []
    step, started = 0, time.perf_counter()
    while step < args.steps:
        for batch in loader:
            if step >= args.steps:
                break
            values = schedules.at(step)
            apply_schedules(optimizer.param_groups, values["lr"], values["wd"], values["last_layer_lr"])
            optimizer.zero_grad(set_to_none=True)
            losses = model.forward_backward(batch, teacher_temp=values["teacher_temp"])
            model.clip_gradients(o.clip_grad)
            optimizer.step()
            model.update_teacher(values["momentum"])
            if step % 10 == 0 or step == args.steps - 1:
                with torch.no_grad():
                    targets, _ = model.teacher_targets(batch, values["teacher_temp"])
                    feats = model.teacher["backbone"].forward_features(batch["collated_global_crops"])
                record = {"step": step, **{k: float(v) for k, v in losses.items()}, **values,
                          "teacher_entropy": mean_entropy(targets),
                          "teacher_cls_std": normalized_feature_std(feats["x_norm_clstoken"])}
                history.append(record)
                print(json.dumps({k: round(v, 4) for k, v in record.items()}), flush=True)
            step += 1
    elapsed = time.perf_counter() - started
    knn_after = knn_top1(model.teacher["backbone"], *probe)
    first, last = history[0], history[-1]
    result = {
        "what": "full DINOv2 objective (DINO+iBOT+KoLeo, Sinkhorn-Knopp, EMA teacher) on Fashion-MNIST, CPU",
        "machine": {"cpu_threads": args.threads, "torch": torch.__version__, "python": platform.python_version()},
        "config": {"steps": args.steps, "batch_size": args.batch_size, "local_crops": args.local_crops,
                   "backbone": "vit_pico patch 4, 28 px, LayerScale init 0.1", "prototypes": head.n_prototypes},
        "seconds": round(elapsed, 1),
        "images_per_second": round(args.steps * args.batch_size / elapsed, 1),
        "total_loss_first": first["total_loss"], "total_loss_last": last["total_loss"],
        "teacher_entropy_uniform": float(np.log(head.n_prototypes)),
        "teacher_entropy_last": last["teacher_entropy"],
        "teacher_cls_std_last": last["teacher_cls_std"],
        "collapse_floor_std": 0.0, "spread_std_reference": float(1 / np.sqrt(model.student["backbone"].embed_dim)),
        "knn_top1_k20_before": knn_before, "knn_top1_k20_after": knn_after,
        "history": history,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "history"}, indent=2))


if __name__ == "__main__":
    main()
