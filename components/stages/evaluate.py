"""The ``evaluate`` stage: k-NN and linear probes of a frozen backbone on Fashion-MNIST, with baselines.

The backbone is a folder (``save_backbone`` layout) or a registry version (``models:/NAME@ALIAS`` or
``models:/NAME/VERSION``), whose artifacts are downloaded once into the state folder. The model and each
baseline (same architecture untrained; raw pixels) go through the same protocols; features are cached
per (model fingerprint, dataset version, extraction options), so re-evaluating the same weights, e.g.
the folder and then its registered version, extracts nothing. One MLflow run records everything;
a registry version also gets the model's metrics as ``eval.*`` tags.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.data import fashion_mnist
from components.evaluate.config import EvaluateConfig, load_evaluate_config, parse_registry_uri
from components.evaluate.features import (
    FeatureSet,
    array_fingerprint,
    cached_feature_set,
    extract_features,
    fashion_mnist_batches,
    model_fingerprint,
    pixel_features,
)
from components.evaluate.knn import knn_classify
from components.evaluate.linear import linear_probe, logreg_probe
from components.models.builders import build_backbone
from components.models.export import BackboneBundle, load_backbone
from components.models.vit import DinoVisionTransformer
from components.stages.context import StageContext
from components.tracking import stage_run

__all__ = ["EvalData", "EvaluateOutputs", "ResolvedModel", "load_evaluate_config", "run_evaluate"]

NUM_CLASSES = len(fashion_mnist.CLASS_NAMES)
MODEL_TAG_PREFIX = "eval."
BASELINE_PREFIX = "baseline_"


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # as configured
    directory: Path  # local backbone folder
    name: str | None = None  # registered model name, when from the registry
    version: str | None = None  # its resolved version number


@dataclass(frozen=True)
class EvalData:
    train_images: np.ndarray  # (N, 28, 28) uint8
    train_labels: np.ndarray  # (N,)
    test_images: np.ndarray
    test_labels: np.ndarray
    version: str  # identifies exactly these images and labels (for the feature cache)


@dataclass(frozen=True)
class EvaluateOutputs:
    metrics: dict[str, float]  # model keys plain, baselines as "<baseline>.<key>" (as logged to MLflow)
    knn_sweep: list[dict[str, float]]  # the model's {k, top1} rows
    model: ResolvedModel
    run_id: str
    metrics_path: Path
    plots_path: Path


def run_evaluate(context: StageContext, cfg: EvaluateConfig) -> EvaluateOutputs:
    import mlflow

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else context.state / "cache" / "features"
    if not cache_dir.is_absolute():
        cache_dir = context.root / cache_dir
    data = load_eval_data(cfg, context.state)
    with stage_run(context.tracking, "evaluate", cfg, tags=context.tags) as run:
        # Resolved inside the run: stage_run has pointed MLflow (and its registry) at the project's server.
        model = resolve_model(cfg.model, context.root, context.state)
        mlflow.set_tags(model_tags(model))
        bundle = load_backbone(model.directory, device=cfg.device)
        metrics = evaluate_backbone(bundle.model, bundle, data, cfg, cache_dir)
        if cfg.baselines.random_init:
            torch.manual_seed(cfg.seed)  # the same untrained weights every run: a cacheable, comparable floor
            random_model = build_backbone(bundle.config).to(cfg.device).eval()
            metrics.update(prefixed("random_init", evaluate_backbone(random_model, bundle, data, cfg, cache_dir)))
        if cfg.baselines.pixels:
            metrics.update(prefixed("pixels", evaluate_pixels(data, cfg)))
        mlflow.log_metrics(metrics)
        sweep = knn_sweep(metrics, cfg.ks)
        for row in sweep:  # also as a stepped series, so the MLflow UI draws the sweep
            mlflow.log_metric("knn_top1_sweep", row["top1"], step=int(row["k"]))
        metrics_path = write_json(context.root / cfg.metrics_path, eval_json(metrics))
        plots_path = write_json(context.root / cfg.plots_path, sweep)
        mlflow.log_artifact(str(metrics_path), artifact_path="eval")
        mlflow.log_artifact(str(plots_path), artifact_path="eval")
        if model.name is not None and model.version is not None:
            tag_model_version(model, metrics, run.info.run_id)
    return EvaluateOutputs(metrics, sweep, model, run.info.run_id, metrics_path, plots_path)


# ---------------------------------------------------------------- model


def resolve_model(uri: str, root: Path, state: Path) -> ResolvedModel:
    """A local folder as is (relative to ``root``); a registry URI downloaded to ``<state>/cache/models``."""
    if not uri.startswith("models:/"):
        directory = Path(uri)
        return ResolvedModel(uri=uri, directory=directory if directory.is_absolute() else root / directory)
    from mlflow import MlflowClient

    ref = parse_registry_uri(uri)
    client = MlflowClient()
    version = (client.get_model_version_by_alias(ref.name, ref.alias) if ref.alias is not None
               else client.get_model_version(ref.name, str(ref.version)))
    number = str(version.version)
    # The source's hash in the folder name: another server's version 3 of the same name is another model.
    source = str(version.source)
    folder = f"{number}-{hashlib.sha256(source.encode()).hexdigest()[:10]}"
    directory = download_version(source, state / "cache" / "models" / safe_name(ref.name) / folder)
    return ResolvedModel(uri=uri, directory=directory, name=ref.name, version=number)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def download_version(source: str, target: Path) -> Path:
    """The version's artifacts in ``target``, downloaded once: a version's files never change.

    The download lands in a staging folder renamed into place, so an interrupted download never
    leaves a folder that looks complete."""
    import mlflow

    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging)))
        if target.exists():
            shutil.rmtree(target)
        os.replace(local, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def model_tags(model: ResolvedModel) -> dict[str, str]:
    tags = {"dinoflow.eval.model_uri": model.uri}
    if model.name is not None and model.version is not None:
        tags.update({"dinoflow.eval.model_name": model.name, "dinoflow.eval.model_version": model.version})
    return tags


def tag_model_version(model: ResolvedModel, metrics: dict[str, float], run_id: str) -> None:
    """The model's own metrics (not the baselines') as ``eval.*`` tags on its registry version."""
    from mlflow import MlflowClient

    assert model.name is not None and model.version is not None
    client = MlflowClient()
    client.set_model_version_tag(model.name, model.version, f"{MODEL_TAG_PREFIX}run_id", run_id)
    for key, value in metrics.items():
        if "." not in key:
            client.set_model_version_tag(model.name, model.version, f"{MODEL_TAG_PREFIX}{key}", f"{value:.6f}")


# ---------------------------------------------------------------- data


def load_eval_data(cfg: EvaluateConfig, state: Path) -> EvalData:
    ds = cfg.dataset
    cache_dir = Path(ds.cache_dir) if ds.cache_dir else state / "cache" / "fashion-mnist"
    folder = fashion_mnist.locate(Path(ds.source_dir), cache_dir, allow_fetch=ds.allow_fetch)
    train = fashion_mnist.load_split(folder, "train")
    test = fashion_mnist.load_split(folder, "test")
    train_idx = fashion_mnist.balanced_subset(train.labels, ds.train_per_class, ds.seed)
    test_idx = fashion_mnist.balanced_subset(test.labels, ds.test_per_class, ds.seed)
    train_images, train_labels = train.images[train_idx], train.labels[train_idx].astype(np.int64)
    test_images, test_labels = test.images[test_idx], test.labels[test_idx].astype(np.int64)
    # Hashing the chosen images and labels themselves: any change of subset, seed or source changes it.
    parts = "".join(array_fingerprint(a) for a in (train_images, train_labels, test_images, test_labels))
    version = "fashion-mnist:" + hashlib.sha256(parts.encode()).hexdigest()[:16]
    return EvalData(train_images, train_labels, test_images, test_labels, version)


# ---------------------------------------------------------------- protocols


def backbone_features(
    model: DinoVisionTransformer, bundle: BackboneBundle, images: np.ndarray, split: str, data_version: str,
    cfg: EvaluateConfig, cache_dir: Path, fingerprint: str | None = None,
) -> FeatureSet:
    """Features of ``images``, cached by the weights themselves (``fingerprint``: model_fingerprint(model))."""
    n_blocks = min(cfg.n_last_blocks, len(model.blocks))
    key = {"model": fingerprint or model_fingerprint(model), "dataset": data_version, "split": split,
           "image_size": cfg.image_size, "n_last_blocks": n_blocks, "mean": list(bundle.mean), "std": list(bundle.std)}

    def compute() -> FeatureSet:
        batches = fashion_mnist_batches(images, cfg.image_size, bundle.mean, bundle.std, cfg.batch_size)
        return extract_features(model, batches, n_last_blocks=n_blocks, avgpool=cfg.avgpool)

    return cached_feature_set(cache_dir, key, compute, avgpool=cfg.avgpool)


def evaluate_backbone(
    model: DinoVisionTransformer, bundle: BackboneBundle, data: EvalData, cfg: EvaluateConfig, cache_dir: Path
) -> dict[str, float]:
    fingerprint = model_fingerprint(model)  # once: hashing a ViT-g's weights takes seconds
    train = backbone_features(model, bundle, data.train_images, "train", data.version, cfg, cache_dir, fingerprint)
    test = backbone_features(model, bundle, data.test_images, "test", data.version, cfg, cache_dir, fingerprint)
    return protocols(train, test, data, cfg)


def evaluate_pixels(data: EvalData, cfg: EvaluateConfig) -> dict[str, float]:
    # No cache: flattening is cheaper than reading a cache entry. One "block", no pooled tokens.
    train = FeatureSet(pixel_features(data.train_images)[:, None])
    test = FeatureSet(pixel_features(data.test_images)[:, None])
    return protocols(train, test, data, cfg)


def protocols(train: FeatureSet, test: FeatureSet, data: EvalData, cfg: EvaluateConfig) -> dict[str, float]:
    metrics = knn_classify(train.cls, data.train_labels, test.cls, data.test_labels, ks=cfg.ks,
                           temperature=cfg.temperature, num_classes=NUM_CLASSES)
    if cfg.linear.enabled:
        result: dict[str, Any] = linear_probe(
            train, data.train_labels, test, data.test_labels, learning_rates=cfg.linear.learning_rates,
            epochs=cfg.linear.epochs, batch_size=cfg.linear.batch_size, val_fraction=cfg.linear.val_fraction,
            seed=cfg.seed, num_classes=NUM_CLASSES)
        metrics["linear_top1"] = float(result["linear_top1"])
    if cfg.logreg.enabled:
        result = logreg_probe(train, data.train_labels, test, data.test_labels, c_grid=cfg.logreg.c_grid,
                              val_fraction=cfg.linear.val_fraction, seed=cfg.seed, max_iter=cfg.logreg.max_iter,
                              tol=cfg.logreg.tol, num_classes=NUM_CLASSES)
        metrics["logreg_top1"] = float(result["logreg_top1"])
    return metrics


# ---------------------------------------------------------------- reports


def prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}.{key}": value for key, value in metrics.items()}


def eval_json(metrics: dict[str, float]) -> dict[str, float]:
    """Flat keys for DVC: the model's as is, a baseline's ``random_init.knn_top1_k20`` as
    ``baseline_random_init_knn_top1_k20`` (no dots, which DVC would read as nesting)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = BASELINE_PREFIX + key.replace(".", "_") if "." in key else key
        out[name] = round(float(value), 6)
    return out


def knn_sweep(metrics: dict[str, float], ks: list[int]) -> list[dict[str, float]]:
    return [{"k": int(k), "top1": round(float(metrics[f"knn_top1_k{k}"]), 6)} for k in sorted(set(ks))]


def write_json(path: Path, payload: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path
