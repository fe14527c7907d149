"""Distillation on CPU: the demo teacher into a ~4x smaller student; k-NN top-1 of both on Fashion-MNIST.

    .venv/bin/python benchmarks/distill_cpu.py --steps 100 --out benchmarks/results/distill_cpu.json

The teacher is ``--teacher`` (a pretraining checkpoint folder, a backbone folder, a .pth), by default the
demo pretraining's checkpoints in outputs/pretrain/checkpoints (heads mode); when absent, one is trained
first with the pretraining engine and params/pretrain.yaml. Each ``--modes`` entry distils a student with
params/distill.yaml into a temporary folder (engine only: no MLflow, no registry). Reported per model:
parameters, k-NN top-1 on the evaluation subset of params/evaluate.yaml (features and protocol of the
evaluate stage), inference images/s; per run: steps, wall time, process CPU time and the load average,
because the machine may be shared. The untrained student is reported too: the CPU demo teacher is weak.

``--eval validation`` chooses settings without the test split: references and queries are two disjoint
class-balanced draws from the train split (``--per-class REFS QUERIES``); ``--eval test`` (default) is the
evaluate stage's subset of the test split, or a larger one with ``--per-class``. ``--set key=value`` overrides
params/distill.yaml (dotted keys under ``distill``, YAML values), for the screens in docs/distillation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from components.data import fashion_mnist
from components.distill.config import DistillConfig, load_distill_config
from components.distill.meta_arch import distill_recipe, objective_for_teacher
from components.distill.teacher import FrozenTeacher, load_teacher, resolve_mode
from components.environment import apply_environment
from components.evaluate.config import EvaluateConfig, load_evaluate_config
from components.models import BackboneConfig, DinoVisionTransformer, build_backbone
from components.models.export import BackboneBundle
from components.stages.evaluate import EvalData, evaluate_backbone, load_eval_data
from components.storage.atomic import write_text_atomic
from components.train.config import load_pretrain_config
from components.train.distributed import DistEnv
from components.train.engine import run_pretraining

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
KNN_KEY = "knn_top1_k20"


class StepCounter:
    def __init__(self) -> None:
        self.losses: list[dict[str, float]] = []

    def log_step(self, step: int, metrics: Mapping[str, float]) -> None:
        self.losses.append({"step": float(step), **{k: float(v) for k, v in metrics.items() if k.endswith("loss")}})

    def close(self) -> None:
        return None


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def demo_teacher(root: Path, scratch: Path, steps: int) -> str:
    """outputs/pretrain/checkpoints when the demo pipeline ran, else a teacher trained here."""
    existing = root / "outputs" / "pretrain" / "checkpoints"
    if existing.is_dir() and any(existing.glob("step_*")):
        return str(existing)
    cfg = load_pretrain_config(root / "params" / "pretrain.yaml")
    cfg.run.output_dir = str(scratch / "teacher")
    cfg.checkpoint.every = 10**9
    cfg.objective.optim.iterations = steps
    run_pretraining(cfg, CPU, root)
    return str(scratch / "teacher" / "checkpoints")


def n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def images_per_second(model: DinoVisionTransformer, size: int, batch: int = 256, repeats: int = 5) -> float:
    model.eval()
    x = torch.randn(batch, 3, size, size)
    model(x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        model(x)
    return batch * repeats / (time.perf_counter() - start)


def knn_top1(model: DinoVisionTransformer, config: BackboneConfig, mean: tuple[float, ...], std: tuple[float, ...],
             data: EvalData, cfg: EvaluateConfig, cache: Path) -> float:
    bundle = BackboneBundle(model=model.eval(), config=config, mean=mean, std=std)
    return float(evaluate_backbone(model, bundle, data, cfg, cache)[KNN_KEY])


def describe(model: DinoVisionTransformer, config: BackboneConfig, knn: float, size: int) -> dict[str, Any]:
    spec = config.resolved_spec()
    return {"arch": config.arch, "patch_size": config.patch_size, "embed_dim": spec.embed_dim, "depth": spec.depth,
            "num_heads": spec.num_heads, "parameters": n_parameters(model), KNN_KEY: round(knn, 4),
            "inference_images_per_second": round(images_per_second(model, size), 1)}


Mode = Literal["auto", "heads", "features"]


def distill_params(root: Path, overrides: list[str]) -> DistillConfig:
    """params/distill.yaml with ``key=value`` overrides (dotted keys below ``distill``), through the same
    loader as ``dinoflow distill --set``."""
    return load_distill_config(root / "params" / "distill.yaml", overrides)


def validation_data(cfg: EvaluateConfig, state: Path, refs_per_class: int, queries_per_class: int) -> EvalData:
    """References and queries: disjoint class-balanced draws from the train split (the test split untouched)."""
    ds = cfg.dataset
    cache_dir = Path(ds.cache_dir) if ds.cache_dir else state / "cache" / "fashion-mnist"
    train = fashion_mnist.load_split(fashion_mnist.locate(Path(ds.source_dir), cache_dir, allow_fetch=ds.allow_fetch),
                                     "train")
    chosen = fashion_mnist.balanced_subset(train.labels, refs_per_class + queries_per_class, ds.seed)
    labels = train.labels[chosen]
    refs, queries = [], []
    for label in np.unique(labels):
        of_class = chosen[labels == label]
        refs.append(of_class[:refs_per_class])
        queries.append(of_class[refs_per_class:])
    ref_idx, query_idx = np.concatenate(refs), np.concatenate(queries)
    return EvalData(train.images[ref_idx], train.labels[ref_idx].astype(np.int64), train.images[query_idx],
                    train.labels[query_idx].astype(np.int64),
                    f"fashion-mnist-validation:{ds.seed}:{refs_per_class}:{queries_per_class}")


def distil(teacher_source: str, mode: Mode, steps: int, root: Path, output: Path, overrides: list[str]
           ) -> tuple[dict[str, Any], Any]:
    cfg = distill_params(root, overrides)
    cfg.teacher.source, cfg.teacher.mode = teacher_source, mode
    cfg.objective.optim.iterations = steps
    cfg.run.output_dir, cfg.checkpoint.every, cfg.run.log_every = str(output), 10**9, 10
    teacher = load_teacher(cfg.teacher.source, cfg.teacher.backbone, "cpu", cfg.teacher.precision)
    resolved = resolve_mode(cfg.teacher.mode, teacher)
    cfg.objective = objective_for_teacher(cfg.objective, teacher, resolved)
    counter = StepCounter()
    load_before, cpu_before, start = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    result, model = run_pretraining(cfg, CPU, root, counter, recipe=distill_recipe(teacher, resolved, cfg.features))
    wall = time.perf_counter() - start
    run = {"mode": resolved, "steps": result.end_step, "batch_size": cfg.data.batch_size_per_rank,
           "wall_seconds": round(wall, 1), "process_cpu_seconds": round(cpu_seconds() - cpu_before, 1),
           "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "first_logged_losses": counter.losses[0] if counter.losses else {},
           "last_logged_losses": counter.losses[-1] if counter.losses else {}}
    return run, (model, cfg, teacher)


def write_json_atomically(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(json.dumps(payload, indent=2) + "\n", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="", help="teacher source (default: the demo pretraining's checkpoints)")
    parser.add_argument("--modes", nargs="+", default=["heads", "features"], choices=["auto", "heads", "features"])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--teacher-steps", type=int, default=100, help="when a teacher has to be trained first")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--eval", choices=["test", "validation"], default="test")
    parser.add_argument("--per-class", nargs=2, type=int, metavar=("REFS", "QUERIES"), default=None,
                        help="images per class for references and queries (default: params/evaluate.yaml's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override params/distill.yaml, e.g. objective.teacher.momentum_teacher=0.992")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/distill_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path.cwd()
    state = apply_environment(start=root)
    eval_cfg = load_evaluate_config(root / "params" / "evaluate.yaml")
    eval_cfg.linear.enabled = eval_cfg.logreg.enabled = False
    if args.per_class:
        eval_cfg.dataset.train_per_class, eval_cfg.dataset.test_per_class = args.per_class
    if args.eval == "validation":
        data = validation_data(eval_cfg, state, eval_cfg.dataset.train_per_class, eval_cfg.dataset.test_per_class)
    else:
        data = load_eval_data(eval_cfg, state)
    with tempfile.TemporaryDirectory(prefix="distill-bench-") as folder:
        scratch = Path(folder)
        cache = scratch / "features"
        started = time.perf_counter()
        source = args.teacher or demo_teacher(root, scratch, args.teacher_steps)
        runs, students = [], []
        teacher: FrozenTeacher | None = None
        for mode in args.modes:
            run, (model, cfg, teacher) = distil(source, mode, args.steps, root, scratch / mode, args.set)
            ema = model.backbone("teacher")
            mean, std = cfg.crops.normalize_mean, cfg.crops.normalize_std
            student = describe(ema, cfg.backbone, knn_top1(ema, cfg.backbone, mean, std, data, eval_cfg, cache),
                               cfg.crops.global_crops_size)
            # The raw student too: after a short run the EMA (the exported model) may lag it.
            raw = model.backbone("student")
            run["raw_student_" + KNN_KEY] = round(knn_top1(raw, cfg.backbone, mean, std, data, eval_cfg, cache), 4)
            runs.append(run)
            students.append({"mode": run["mode"], **student})
        assert teacher is not None
        teacher_knn = knn_top1(teacher.backbone, teacher.config, mean, std, data, eval_cfg, cache)
        torch.manual_seed(eval_cfg.seed)
        random_student = build_backbone(cfg.backbone)
        random_knn = knn_top1(random_student, cfg.backbone, mean, std, data, eval_cfg, cache)
        # With LayerScale 1e-5 an untrained CLS is nearly constant (near chance): the random-feature
        # floor with full residual branches is the one retention must be read against.
        plain_config = dataclasses.replace(cfg.backbone, layerscale_init=None)
        torch.manual_seed(eval_cfg.seed)
        plain_student = build_backbone(plain_config)
        plain_knn = knn_top1(plain_student, plain_config, mean, std, data, eval_cfg, cache)
        teacher_row = describe(teacher.backbone, teacher.config, teacher_knn, cfg.crops.global_crops_size)
        for student in students:
            student["knn_retained_vs_teacher"] = round(student[KNN_KEY] / teacher_knn, 4)
            student["parameter_ratio_vs_teacher"] = round(student["parameters"] / teacher_row["parameters"], 4)
        report = {
            "benchmark": "distill_cpu", "teacher_source": source, "teacher": teacher_row, "students": students,
            "random_init_student": describe(random_student, cfg.backbone, random_knn, cfg.crops.global_crops_size),
            "random_init_student_without_layerscale": describe(plain_student, plain_config, plain_knn,
                                                               cfg.crops.global_crops_size),
            "runs": runs, "goal": "student k-NN top-1 >= 0.95 x teacher",
            "overrides": args.set,
            "eval": {"metric": KNN_KEY, "split": args.eval, "train_per_class": eval_cfg.dataset.train_per_class,
                     "test_per_class": eval_cfg.dataset.test_per_class, "image_size": eval_cfg.image_size},
            "total_wall_seconds": round(time.perf_counter() - started, 1),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(),
        }
    write_json_atomically(args.out, report)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
