"""Train the SSCD-style copy descriptor (components/curation/copy_descriptor.py) and save it as a backbone folder.

    .venv/bin/python benchmarks/train_copy_descriptor.py --max-seconds 480
    .venv/bin/python benchmarks/copy_detection.py --backbone .dinoflow/bench/copy_descriptor/backbone \\
        --image-size 28 --threads 1 --out benchmarks/results/copy_detection_sscd.json

The pool is Fashion-MNIST: by default the train split **without the rows benchmarks/copy_detection.py
draws for its fashion domain** (``--benchmark-pool-size`` / ``--benchmark-seed``, its defaults), so the
benchmark never scores images the descriptor was trained on; ``--split test`` trains on the test split
instead. The digits and photos domains of the benchmark are never trained on.

After training, the exported folder is loaded back through the embed step's own loader
(``load_embedder``) and validated on held-out images of the other split (none of them trained on,
none in the benchmark): each of ``--val-copies`` images gets one copy with the benchmark's edits, and
the recall is read at the threshold where 1% of the held-out images have a distinct neighbour above it.

Writes ``<out>/backbone`` (config.json + model.safetensors) and ``<out>/training.json`` (the config,
the loss curve, images/s, the validation); ``--json`` writes the JSON elsewhere too.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from copy_detection import fashion_pool_rows  # noqa: E402

from components.curation.copy_descriptor import (  # noqa: E402
    CopyDescriptorConfig,
    export_copy_descriptor,
    train_copy_descriptor,
)
from components.curation.copy_edits import CopyEditConfig, copy_rng, random_copy  # noqa: E402
from components.curation.embed import EmbedConfig, describe_images, load_embedder  # noqa: E402

DEFAULT_OUT = REPO_ROOT / ".dinoflow" / "bench" / "copy_descriptor"


def fashion_split(name: str) -> np.ndarray:
    from components.data import fashion_mnist

    folder = fashion_mnist.locate(fashion_mnist.INSTALLED_DATA_DIR, Path("/nonexistent"), allow_fetch=False)
    return fashion_mnist.load_split(folder, name).images  # (N, 28, 28) uint8


def unused_train_rows(n_images: int, args: argparse.Namespace) -> np.ndarray:
    """Train-split rows the copy-detection benchmark does not draw (sorted)."""
    used = fashion_pool_rows(n_images, args.benchmark_pool_size, args.benchmark_seed)
    return np.setdiff1d(np.arange(n_images), used)


def pools(args: argparse.Namespace) -> tuple[list[Image.Image], list[Image.Image], dict[str, Any]]:
    """(training pool, validation pool, what they are): the two never share an image or the benchmark's."""
    train, test = fashion_split("train"), fashion_split("test")  # (60000, 28, 28), (10000, 28, 28)
    free_train = unused_train_rows(len(train), args)
    if args.split == "train":
        training, validation = train[free_train], test
        described = {"training": f"Fashion-MNIST train minus the benchmark's {len(train) - len(free_train)} rows",
                     "validation": "Fashion-MNIST test"}
    else:
        training, validation = test, train[free_train]
        described = {"training": "Fashion-MNIST test",
                     "validation": "Fashion-MNIST train minus the benchmark's rows"}
    rows = np.random.default_rng(args.seed + 7).choice(len(validation), size=args.val_size, replace=False)
    described.update({"training_images": len(training), "validation_images": args.val_size})
    return ([Image.fromarray(im, mode="L") for im in training],
            [Image.fromarray(validation[int(r)], mode="L") for r in np.sort(rows)], described)


def validate(folder: Path, images: list[Image.Image], n_copies: int, image_size: int, seed: int) -> dict[str, Any]:
    """Load ``folder`` as ``embed.backbone`` and measure copy recall at 1% (and 0.1%) distinct false removal."""
    embed = EmbedConfig(backbone=str(folder), image_size=image_size, batch_size=256, num_threads=1)
    embedder = load_embedder(embed)
    pool = describe_images(images, embed, embedder)  # (N, D)
    cosines = pool @ pool.T  # (N, N)
    np.fill_diagonal(cosines, -np.inf)
    distinct = cosines.max(axis=1)  # (N,) each image's nearest other image
    edits = CopyEditConfig()
    copies = [random_copy(images[i], copy_rng(seed, i), edits)[0] for i in range(n_copies)]
    copy_scores = np.einsum("nd,nd->n", pool[:n_copies], describe_images(copies, embed, embedder))  # (n,)
    out: dict[str, Any] = {"pool": len(images), "copies": n_copies,
                           "distinct_cosine_median": round(float(np.median(distinct)), 4),
                           "copy_cosine_median": round(float(np.median(copy_scores)), 4)}
    for share in (0.01, 0.001):
        threshold = float(np.quantile(distinct, 1.0 - share))
        out[f"recall_at_{share:g}_false_removal"] = round(float(np.mean(copy_scores > threshold)), 4)
        out[f"threshold_at_{share:g}"] = round(threshold, 4)
    return out


# The CopyDescriptorConfig fields this command exposes as flags (--batch-size for batch_size, ...).
CONFIG_FLAGS = ("steps", "batch_size", "image_size", "patch_size", "embed_dim", "depth", "num_heads", "lr",
                "warmup_steps", "temperature", "koleo_weight", "identity_view_prob", "seed")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    defaults = CopyDescriptorConfig()
    for name in CONFIG_FLAGS:
        default = getattr(defaults, name)
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)


def config_from(args: argparse.Namespace) -> CopyDescriptorConfig:
    return CopyDescriptorConfig(**{name: getattr(args, name) for name in CONFIG_FLAGS}, num_threads=args.threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", choices=("train", "test"), default="train", help="Fashion-MNIST split to train on")
    parser.add_argument("--benchmark-pool-size", type=int, default=3000, help="copy_detection.py --pool-size")
    parser.add_argument("--benchmark-seed", type=int, default=0, help="copy_detection.py --seed")
    parser.add_argument("--max-seconds", type=float, default=None, help="wall-clock budget of the training loop")
    add_config_flags(parser)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (keep 1 on a shared machine)")
    parser.add_argument("--val-size", type=int, default=2000, help="held-out validation pool")
    parser.add_argument("--val-copies", type=int, default=1000, help="validation images that get a copy")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for backbone/ and training.json")
    parser.add_argument("--json", default=None, help="also write the training JSON here")
    args = parser.parse_args(argv)
    cfg = config_from(args)
    cfg.validate()
    training, validation, described = pools(args)
    print(f"training on {described['training']} ({len(training)} images); validating on "
          f"{described['validation']} ({len(validation)})", flush=True)

    def show(row: dict[str, float]) -> None:
        if row["step"] == 1 or row["step"] % 50 == 0:
            print(f"step {int(row['step']):5d} {row['seconds']:7.1f} s lr {row['lr']:.2e} loss {row['loss']:.3f} "
                  f"(nce {row['info_nce']:.3f} koleo {row['koleo']:.3f}) pos {row['positive_cosine']:.3f} "
                  f"hardest neg {row['hardest_negative_cosine']:.3f}", flush=True)

    run = train_copy_descriptor(training, cfg, max_seconds=args.max_seconds, on_log=show)
    out = Path(args.out)
    folder = export_copy_descriptor(run, out / "backbone", metadata={"trained_on": described["training"]})
    started = time.perf_counter()
    val = validate(folder, validation, min(args.val_copies, len(validation)), cfg.image_size, args.seed + 11)
    val["seconds"] = round(time.perf_counter() - started, 1)
    print(f"trained {run.steps} steps in {run.seconds:.0f} s ({run.images_per_second:.0f} images/s); "
          f"validation {val}", flush=True)
    payload = {"benchmark": "train_copy_descriptor",
               "command": " ".join(["benchmarks/train_copy_descriptor.py", *sys.argv[1:]]),
               "backbone": str(folder.relative_to(REPO_ROOT) if folder.is_relative_to(REPO_ROOT) else folder),
               "data": described, "max_seconds": args.max_seconds, **run.summary(), "validation": val,
               "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    text = json.dumps(payload, indent=2) + "\n"
    (out / "training.json").write_text(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(f"wrote {folder} and {out / 'training.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
