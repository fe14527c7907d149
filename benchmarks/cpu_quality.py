"""Backbone quality per minute of CPU training: a wall-clock-budgeted pretraining run on Fashion-MNIST.

Trains a preset with the real engine (``run_pretraining``: manifest of PNGs, loader, schedules,
checkpoints) on the 60,000 train images and evaluates the teacher at given minutes of *training*
(evaluation time is not counted) with the full protocol: CLS (``x_norm_clstoken``), L2-normalised,
cosine k-NN, k=20, T=0.07 weighting, top-1.

* ``--split val``: 50,000 train references -> the other 10,000 train images as queries (choose settings here);
* ``--split test``: 60,000 train references -> the 10,000 test images (report final choices only).

The schedule length (``optim.iterations``) is set from a short calibration of the step rate so that
the schedule ends at the budget (``--iterations N`` fixes it instead). The same run measures raw
pixels and the random-init model (same seed, same architecture), images/s end to end, the model
step alone on one fixed batch, and the data-loading share. Results: JSON (``--out``) and, with
``--plot``, a PNG of k-NN against minutes with both floors and the official-code anchors.

    python benchmarks/cpu_quality.py --params params/pretrain.yaml --minutes 5 10 --split val \
        --set objective.optim.base_lr=0.002 --out benchmarks/results/ablation/lr2e-3.json
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components.config import to_mapping  # noqa: E402
from components.data import fashion_mnist  # noqa: E402
from components.evaluate.features import extract_features, fashion_mnist_batches, pixel_features  # noqa: E402
from components.evaluate.knn import knn_classify  # noqa: E402
from components.ssl.meta_arch import SSLMetaArch, resolve_precision  # noqa: E402
from components.ssl.monitoring import uniform_entropy  # noqa: E402
from components.train.config import PretrainConfig, load_pretrain_config  # noqa: E402
from components.train.distributed import DistEnv  # noqa: E402
from components.train.engine import DataStream, ModelRecipe, collate_step, run_pretraining, schedules_for  # noqa: E402

# The official DINOv2 code on these 2 cores (ViT 192/6/3, patch 4, 2x28 + 8x12, batch 128, K=4096, SK,
# LayerScale 0.1), measured by hand with this protocol (../shared/docs/environment.md).
OFFICIAL_ANCHORS = [{"minutes": 10, "knn_top1": 0.639}, {"minutes": 25, "knn_top1": 0.671}]
VAL_REFERENCES = 50_000
MONITOR_EVERY = 25  # steps between two samples of the teacher-entropy / feature-std monitors in the JSON
K, TEMPERATURE = 20, 0.07


def load_preset(path: Path, overrides: list[str]) -> PretrainConfig:
    """The preset with ``--set`` overrides, through the same loader as ``dinoflow pretrain --set``."""
    return load_pretrain_config(path, overrides)


def write_train_manifest(work: Path, images: np.ndarray) -> Path:
    """The 60k train images as PNG files plus a manifest (cached across runs)."""
    import polars as pl
    from PIL import Image

    manifest = work / "fmnist_train.parquet"
    if manifest.is_file():
        return manifest
    folder = work / "fmnist_train"
    folder.mkdir(parents=True, exist_ok=True)
    uris = []
    for index, pixels in enumerate(images):
        path = folder / f"{index:05d}.png"
        if not path.is_file():
            buffer = io.BytesIO()
            Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
            path.write_bytes(buffer.getvalue())
        uris.append(path.resolve().as_uri())
    tmp = manifest.with_suffix(".tmp")
    pl.DataFrame({"uri": uris, "split": ["train"] * len(uris)}).write_parquet(tmp)
    tmp.replace(manifest)
    return manifest


@dataclasses.dataclass
class Protocol:
    """References and queries of the chosen split, as uint8 images and labels."""

    ref_images: np.ndarray
    ref_labels: np.ndarray
    query_images: np.ndarray
    query_labels: np.ndarray

    @staticmethod
    def build(split: str, train: fashion_mnist.Split, test: fashion_mnist.Split) -> Protocol:
        if split == "test":
            return Protocol(train.images, train.labels, test.images, test.labels)
        order = np.random.default_rng(12345).permutation(len(train.labels))
        ref, query = order[:VAL_REFERENCES], order[VAL_REFERENCES:]
        return Protocol(train.images[ref], train.labels[ref], train.images[query], train.labels[query])


def knn_of_features(protocol: Protocol, refs: np.ndarray, queries: np.ndarray) -> float:
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    metrics = knn_classify(unit(refs), protocol.ref_labels, unit(queries), protocol.query_labels, ks=(K,),
                           temperature=TEMPERATURE, num_classes=10)
    return metrics[f"knn_top1_k{K}"]


def backbone_knn(model: torch.nn.Module, cfg: PretrainConfig, protocol: Protocol) -> float:
    """k-NN top-1 of a backbone's last-block CLS (``x_norm_clstoken``) on the protocol."""
    crops = cfg.crops

    def features(images: np.ndarray) -> np.ndarray:
        batches = fashion_mnist_batches(images, crops.global_crops_size, crops.normalize_mean, crops.normalize_std,
                                        batch_size=1024)
        return extract_features(model, batches).cls  # type: ignore[arg-type]

    return knn_of_features(protocol, features(protocol.ref_images), features(protocol.query_images))


class Evaluator:
    """``after_step`` hook: evaluates the teacher when training time crosses each mark; stops at the last."""

    def __init__(self, cfg: PretrainConfig, protocol: Protocol, marks_minutes: list[float], out: Path,
                 record: dict[str, Any]) -> None:
        self.cfg, self.protocol, self.out, self.record = cfg, protocol, out, record
        self.marks = sorted(marks_minutes)
        self.start = time.perf_counter()
        self.paused = 0.0

    def training_seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def __call__(self, steps_done: int, model: SSLMetaArch) -> bool:
        if steps_done % MONITOR_EVERY == 0:  # the collapse monitors: ln K teacher entropy = a dead DINO head
            monitors = {k: round(v, 4) for k, v in model.last_step_monitors().items()}
            self.record.setdefault("monitors", []).append({"step": steps_done, **monitors})
        trained = self.training_seconds()
        if not self.marks or trained < self.marks[0] * 60:
            return False
        pause = time.perf_counter()
        mark = self.marks.pop(0)
        knn = backbone_knn(model.backbone("teacher"), self.cfg, self.protocol)
        eval_seconds = time.perf_counter() - pause
        self.paused += eval_seconds
        images = steps_done * self.cfg.data.batch_size_per_rank
        self.record["curve"].append({"minutes": mark, "training_seconds": round(trained, 1), "step": steps_done,
                                     "images_seen": images, "knn_top1": round(knn, 4),
                                     "eval_seconds": round(eval_seconds, 1)})
        print(f"[{mark:g} min] step {steps_done} k-NN top-1 {knn:.4f} (eval {eval_seconds:.0f} s)", flush=True)
        write_json(self.out, self.record)
        return not self.marks


def model_step_rate(cfg: PretrainConfig, env: DistEnv, root: Path, n_steps: int = 12) -> dict[str, float]:
    """Images/s of the model step alone (forward, backward, optimizer, EMA) on one fixed, pre-collated batch."""
    from components.train.engine import build_model

    torch.manual_seed(cfg.data.seed)
    model, optimizer = build_model(cfg, env)
    stream = DataStream(cfg, env, root)
    loaded = stream.batches(0)
    assert loaded is not None
    batch = collate_step(cfg, loaded.batch, 0, env.device)
    schedules = schedules_for(cfg, stream.global_batch)
    values = schedules.at(cfg.objective.optim.warmup_iters)
    times = []
    for _ in range(n_steps):
        tick = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=values["teacher_temp"])
        optimizer.step()
        model.update_teacher(values["momentum"])
        times.append(time.perf_counter() - tick)
    step = float(np.median(times[2:]))
    return {"model_step_seconds": step, "model_step_images_per_second": cfg.data.batch_size_per_rank / step}


def calibrated_iterations(cfg: PretrainConfig, env: DistEnv, root: Path, budget_s: float, work: Path) -> int:
    """Steps that fit the budget, from a short run of the real loop (loader included)."""
    probe = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(work / "calibration"),
                                                              log_every=10_000),
                                checkpoint=dataclasses.replace(cfg.checkpoint, every=10_000))
    probe.objective.optim = dataclasses.replace(cfg.objective.optim, iterations=10_000, warmup_iters=10,
                                                freeze_last_layer_iters=0)
    marks: list[float] = []

    def timer(steps_done: int, _model: SSLMetaArch) -> bool:
        marks.append(time.perf_counter())
        return steps_done >= 25

    import shutil

    shutil.rmtree(work / "calibration", ignore_errors=True)
    run_pretraining(probe, env, root, after_step=timer)
    shutil.rmtree(work / "calibration", ignore_errors=True)
    per_step = (marks[-1] - marks[5]) / (len(marks) - 6)
    return max(int(budget_s / per_step), 1)


def random_init_without_layerscale(cfg: PretrainConfig) -> torch.nn.Module:
    """The same architecture untrained with LayerScale off. With the official init (1e-5) an untrained
    model's residual branches are ~0, so every image gets nearly the same CLS token and the random-init
    floor is near chance; this floor (a random ViT with full residual branches) is the meaningful one."""
    plain = dataclasses.replace(cfg, backbone=dataclasses.replace(cfg.backbone, layerscale_init=None))
    torch.manual_seed(cfg.data.seed)
    return ModelRecipe().build(plain).backbone("teacher")


def scaled_schedule(cfg: PretrainConfig, iterations: int) -> PretrainConfig:
    """The preset's schedule stretched to ``iterations``: warm-ups and the prototype freeze keep their share."""
    o, t = cfg.objective.optim, cfg.objective.teacher
    factor = iterations / o.iterations
    objective = dataclasses.replace(
        cfg.objective,
        optim=dataclasses.replace(o, iterations=iterations, warmup_iters=round(o.warmup_iters * factor),
                                  freeze_last_layer_iters=round(o.freeze_last_layer_iters * factor)),
        teacher=dataclasses.replace(t, warmup_teacher_temp_iters=round(t.warmup_teacher_temp_iters * factor)),
    )
    return dataclasses.replace(cfg, objective=objective)


def cpu_model_name() -> str:
    """The CPU's marketing name (results from different CPUs are not comparable)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)


def plot(record: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curve = record["curve"]
    ax.plot([0] + [p["minutes"] for p in curve], [record["random_init_knn_top1"]] + [p["knn_top1"] for p in curve],
            "o-", label=f"dinoflow {record['label']} (seed {record['seed']})")
    ax.axhline(record["pixels_knn_top1"], color="grey", ls="--", label="raw pixels")
    ax.axhline(record["random_init_knn_top1"], color="black", ls=":", label="random init (preset's LayerScale)")
    if record.get("random_init_without_layerscale_knn_top1") is not None:
        ax.axhline(record["random_init_without_layerscale_knn_top1"], color="tab:brown", ls=":",
                   label="random init, LayerScale off")
    if record["split"] == "test":
        ax.plot([a["minutes"] for a in OFFICIAL_ANCHORS], [a["knn_top1"] for a in OFFICIAL_ANCHORS], "s",
                color="tab:red", label="official code, 192/6/3 (hand-measured)")
    ax.set_xlabel("minutes of training (2 CPU cores)")
    ax.set_ylabel(f"k-NN top-1 (k={K}, {record['split']})")
    ax.set_title("Fashion-MNIST: teacher CLS k-NN vs training time")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=ROOT / "params/pretrain.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pretrain key, e.g. objective.optim.base_lr=0.002 (YAML value)")
    parser.add_argument("--minutes", type=float, nargs="+", default=[5, 10, 20, 30])
    parser.add_argument("--split", choices=["val", "test"], default="val")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=0, help="schedule length; 0: calibrated to the budget")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=ROOT / ".dinoflow/bench/cpu_quality")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-floors", action="store_true",
                        help="skip the raw-pixel and random-init evaluations (screening runs)")
    parser.add_argument("--floors-only", action="store_true",
                        help="measure the floors and write the JSON without training")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    overrides = [*args.overrides, f"data.seed={args.seed}"]
    cfg = load_preset(args.params, overrides)
    folder = fashion_mnist.locate(Path("/usr/share/datasets/fashion-mnist"), ROOT / ".dinoflow/cache")
    train, test = fashion_mnist.load_split(folder, "train"), fashion_mnist.load_split(folder, "test")
    protocol = Protocol.build(args.split, train, test)
    work = args.work
    manifest = write_train_manifest(work, train.images)
    run_dir = work / "runs" / args.out.stem
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, manifest=str(manifest), splits=[]),
        run=dataclasses.replace(cfg.run, output_dir=str(run_dir), log_every=10**9),
        checkpoint=dataclasses.replace(cfg.checkpoint, every=10**9),
    )
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    budget_s = max(args.minutes) * 60
    iterations = args.iterations or calibrated_iterations(cfg, env, ROOT, budget_s, work)
    cfg = scaled_schedule(cfg, iterations)
    cfg.validate()

    torch.manual_seed(cfg.data.seed)
    random_init = ModelRecipe().build(cfg).backbone("teacher")
    pixels_knn: float | None
    random_knn: float | None
    random_plain_knn: float | None
    if args.no_floors:
        pixels_knn, random_knn, random_plain_knn = None, None, None
    else:
        pixels_knn = knn_of_features(protocol, pixel_features(protocol.ref_images),
                                     pixel_features(protocol.query_images))
        random_knn = backbone_knn(random_init, cfg, protocol)
        random_plain_knn = backbone_knn(random_init_without_layerscale(cfg), cfg, protocol)
    record: dict[str, Any] = {
        "label": args.label or args.out.stem, "split": args.split, "seed": args.seed,
        "protocol": {"features": "x_norm_clstoken, L2-normalised", "k": K, "temperature": TEMPERATURE,
                     "references": len(protocol.ref_labels), "queries": len(protocol.query_labels)},
        "params_file": str(args.params.relative_to(ROOT) if args.params.is_relative_to(ROOT) else args.params),
        "overrides": args.overrides, "iterations": iterations, "budget_minutes": max(args.minutes),
        "pixels_knn_top1": None if pixels_knn is None else round(pixels_knn, 4),
        "random_init_knn_top1": None if random_knn is None else round(random_knn, 4),
        "random_init_without_layerscale_knn_top1": None if random_plain_knn is None else round(random_plain_knn, 4),
        "backbone_parameters": sum(p.numel() for p in random_init.parameters()),
        "precision": resolve_precision(cfg.objective.precision, env.device),
        "machine": {"cpu": cpu_model_name(), "cpu_count": os.cpu_count(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "python": platform.python_version()},
        "curve": [],
        "uniform_teacher_entropy": round(uniform_entropy(cfg.objective.dino.head.n_prototypes), 4),
        "config": to_mapping(cfg),
    }
    del random_init
    print(f"pixels {record['pixels_knn_top1']}, random init {record['random_init_knn_top1']}, "
          f"{iterations} iterations", flush=True)
    write_json(args.out, record)
    if args.floors_only:
        return 0
    evaluator = Evaluator(cfg, protocol, list(args.minutes), args.out, record)
    started = time.perf_counter()
    result, model = run_pretraining(cfg, env, ROOT, after_step=evaluator)
    trained = evaluator.training_seconds()
    steps = result.end_step - result.start_step
    if evaluator.marks:  # the schedule ended before the last mark: evaluate the end point too
        knn = backbone_knn(model.backbone("teacher"), cfg, protocol)
        record["curve"].append({"minutes": round(trained / 60, 2), "training_seconds": round(trained, 1),
                                "step": result.end_step, "knn_top1": round(knn, 4), "schedule_end": True})
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    record["steps"] = steps
    record["step_seconds"] = round(trained / max(steps, 1), 4)
    record["images_per_second"] = round(steps * cfg.data.batch_size_per_rank / max(trained, 1e-9), 1)
    record.update({k: round(v, 4) for k, v in model_step_rate(cfg, env, ROOT).items()})
    # Measured in the run itself: the share of loop time spent waiting for the next batch. The ratio of
    # two rates measured minutes apart is also kept, but on a shared machine whose speed drifts it is noisy.
    record["data_loading_share"] = round(result.data_wait_seconds / max(result.loop_seconds, 1e-9), 4)
    record["end_to_end_over_model_step_in_run"] = round(1 - record["data_loading_share"], 4)
    record["end_to_end_over_model_step"] = round(record["images_per_second"] / record["model_step_images_per_second"],
                                                 3)
    record["last_losses"] = result.last_losses
    write_json(args.out, record)
    if args.plot:
        plot(record, args.plot)
    shutil.rmtree(run_dir, ignore_errors=True)
    print(json.dumps({k: record[k] for k in ("curve", "images_per_second", "model_step_images_per_second")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
