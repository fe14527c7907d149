"""The ``evaluate`` stage: k-NN and linear probes of a frozen backbone on Fashion-MNIST, with baselines.

The backbone is a folder (``save_backbone`` layout) or a registry version (``models:/NAME@ALIAS`` or
``models:/NAME/VERSION``), whose artifacts are downloaded once into the state folder. The model and each
baseline (same architecture untrained; raw pixels) go through the same protocols; features are cached
per (model fingerprint, dataset version, extraction options), so re-evaluating the same weights, e.g.
the folder and then its registered version, extracts nothing. One MLflow run records everything;
a registry version also gets the model's metrics as ``eval.*`` tags. The current champion's ``eval.*``
tags, when it is another version, ride along as the report's "champion" column.

``run_promotion`` is the champion / challenger round: it evaluates the versions behind both aliases,
decides with the promotion policy and moves the ``champion`` alias only on a successful evaluation of
both that says "promote" (components/evaluate/promotion.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components.data import fashion_mnist
from components.evaluate.bootstrap import Interval, paired_bootstrap
from components.evaluate.config import EvaluateConfig, load_evaluate_config
from components.evaluate.copydetect import evaluate_copydetect
from components.evaluate.dense import DenseConfig, evaluate_dense
from components.evaluate.features import (
    FeatureSet,
    array_fingerprint,
    cached_feature_set,
    extract_features,
    fashion_mnist_batches,
    model_fingerprint,
    pixel_features,
)
from components.evaluate.knn import knn_evaluate
from components.evaluate.linear import linear_probe, logreg_probe
from components.evaluate.pca_picture import evaluate_pca_picture
from components.evaluate.promotion import Decision, PromotionPolicy, decide
from components.evaluate.report import eval_json
from components.evaluate.retrieval import RetrievalConfig, evaluate_retrieval
from components.models.builders import build_backbone
from components.models.export import BackboneBundle
from components.models.vit import DinoVisionTransformer
from components.registry.loader import load_resolved
from components.registry.promotion import (
    ChampionMetrics,
    apply_decision,
    champion_metrics,
    record_failure,
    version_by_alias,
)
from components.registry.publish import tag_evaluation
from components.registry.resolve import ResolvedModel, default_client, resolve
from components.registry.uri import alias_uri, parse_source, version_uri
from components.stages.context import StageContext
from components.storage.atomic import write_text_atomic
from components.tracking import stage_run
from components.tracking.mlflow_setup import configure

__all__ = [
    "EvalData",
    "EvaluateOutputs",
    "EvaluationFailed",
    "PromotionOutcome",
    "load_evaluate_config",
    "model_metrics",
    "run_evaluate",
    "run_promotion",
]

NUM_CLASSES = len(fashion_mnist.CLASS_NAMES)


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
    champion: ChampionMetrics | None = None  # the champion's eval.* numbers, when it is another version
    # Each query's outcome under the model's k-NN metrics (bool, (n_queries,)), and which queries they
    # are (EvalData.version): what a paired comparison of two models needs. Not in the summary.
    per_query: dict[str, np.ndarray] = field(default_factory=dict)
    data_version: str = ""

    def summary(self) -> dict[str, object]:
        """What the CLI prints, the flow returns and its report shows: metrics and ids (no features),
        the champion's numbers if any."""
        champion = None if self.champion is None else {"version": self.champion.version,
                                                       "metrics": self.champion.metrics}
        return {"model": self.model.uri, "model_version": self.model.version, "mlflow_run_id": self.run_id,
                "metrics_path": str(self.metrics_path), "metrics": self.metrics, "champion": champion}


def run_evaluate(context: StageContext, cfg: EvaluateConfig) -> EvaluateOutputs:
    import mlflow

    cache_dir = Path(cfg.cache_dir) if cfg.cache_dir else context.state / "cache" / "features"
    if not cache_dir.is_absolute():
        cache_dir = context.root / cache_dir
    data = load_eval_data(cfg, context.state)
    with stage_run(context.tracking, "evaluate", cfg, tags=context.tags) as run:
        # Resolved inside the run: stage_run has pointed MLflow (and its registry) at the project's server.
        model = resolve(cfg.model, context.root, context.state / "cache" / "models")
        mlflow.set_tags(model_tags(model))
        bundle = load_resolved(model, device=cfg.device, root=context.root)
        per_query: dict[str, np.ndarray] = {}
        metrics = evaluate_backbone(bundle.model, bundle, data, cfg, cache_dir, per_query)
        pictures = Path(tempfile.mkdtemp(prefix="eval-pictures-", dir=ensure_dir(context.state / "tmp")))
        try:
            metrics.update(optional_suites(bundle, cfg, context, cache_dir, pictures))
            for picture in sorted(pictures.glob("*.png")):
                mlflow.log_artifact(str(picture), artifact_path="eval/pictures")
        finally:
            shutil.rmtree(pictures, ignore_errors=True)
        if cfg.baselines.random_init:
            torch.manual_seed(cfg.seed)  # the same untrained weights every run: a cacheable, comparable floor
            random_model = build_backbone(bundle.config).to(cfg.device).eval()
            metrics.update(prefixed("random_init", evaluate_backbone(random_model, bundle, data, cfg, cache_dir)))
        if cfg.baselines.random_no_layerscale and bundle.config.layerscale_init:
            torch.manual_seed(cfg.seed)
            plain = dataclasses.replace(bundle.config, layerscale_init=None)
            plain_model = build_backbone(plain).to(cfg.device).eval()
            metrics.update(prefixed("random_no_layerscale",
                                    evaluate_backbone(plain_model, bundle, data, cfg, cache_dir)))
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
            tag_evaluation(model.name, model.version, metrics, run.info.run_id)
        champion = current_champion(cfg.champion, model)
        if champion is not None:
            mlflow.set_tag("dinoflow.eval.champion_version", champion.version)
            mlflow.log_metrics({f"champion.{key}": value for key, value in champion.metrics.items()})
    return EvaluateOutputs(metrics, sweep, model, run.info.run_id, metrics_path, plots_path, champion, per_query,
                           data.version)


def model_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The model's own numbers: the keys without a ``<baseline>.`` prefix."""
    return {key: value for key, value in metrics.items() if "." not in key}


def current_champion(champion_uri: str, model: ResolvedModel) -> ChampionMetrics | None:
    """The champion's eval.* numbers, unless there is none, it is the model itself, or comparison is off."""
    if not champion_uri:
        return None
    ref = parse_source(champion_uri).require("registry")
    assert ref.name is not None and ref.alias is not None  # EvaluateConfig.validate refuses a version number
    same_model = model.version if model.name == ref.name else None
    return champion_metrics(default_client(), ref.name, ref.alias, exclude_version=same_model)


# ---------------------------------------------------------------- optional suites


def ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def state_path(value: str, default: str, state_default: Path, root: Path) -> str:
    """A suite's data folder: its class default moves into the state folder, a relative one under root."""
    if value == default:
        return str(state_default)
    return value if Path(value).is_absolute() else str(root / value)


def optional_suites(bundle: BackboneBundle, cfg: EvaluateConfig, context: StageContext, cache_dir: Path,
                    pictures: Path) -> dict[str, float]:
    """Retrieval, copy detection, dense probes and the PCA picture, each when its section is enabled.

    They score the model only: their floors are not part of the demo report. Pictures land in
    ``pictures`` for the caller to log."""
    metrics: dict[str, float] = {}
    model, device, batch = bundle.model, cfg.device, cfg.batch_size
    fmnist_cache = context.state / "cache" / "fashion-mnist"
    if cfg.retrieval.enabled:
        suite = dataclasses.replace(cfg.retrieval, data_cache_dir=state_path(
            cfg.retrieval.data_cache_dir, RetrievalConfig.data_cache_dir, fmnist_cache, context.root))
        metrics.update(evaluate_retrieval(model, suite, bundle.mean, bundle.std, cache_dir=cache_dir,
                                          picture_dir=pictures, device=device, batch_size=batch))
    if cfg.copydetect.enabled:
        metrics.update(evaluate_copydetect(model, cfg.copydetect, bundle.mean, bundle.std, cache_dir=cache_dir,
                                           device=device, batch_size=batch))
    if cfg.dense.enabled:
        dense = dataclasses.replace(
            cfg.dense,
            data_cache_dir=state_path(cfg.dense.data_cache_dir, DenseConfig.data_cache_dir, fmnist_cache, context.root),
            demo_dir=state_path(cfg.dense.demo_dir, DenseConfig.demo_dir, context.state / "cache" / "dense-demo",
                                context.root))
        metrics.update(evaluate_dense(model, dense, bundle.mean, bundle.std, cache_dir=cache_dir, device=device,
                                      batch_size=batch))
    if cfg.pca_picture.enabled:
        metrics.update(evaluate_pca_picture(model, cfg.pca_picture, bundle.mean, bundle.std, pictures,
                                            device=device, batch_size=batch))
    return metrics


# ---------------------------------------------------------------- model


def model_tags(model: ResolvedModel) -> dict[str, str]:
    tags = {"dinoflow.eval.model_uri": model.uri}
    if model.name is not None and model.version is not None:
        tags.update({"dinoflow.eval.model_name": model.name, "dinoflow.eval.model_version": model.version})
    return tags


# ---------------------------------------------------------------- data


def load_eval_data(cfg: EvaluateConfig, state: Path) -> EvalData:
    ds = cfg.dataset
    cache_dir = Path(ds.cache_dir) if ds.cache_dir else state / "cache" / "fashion-mnist"
    folder = fashion_mnist.locate(Path(ds.source_dir), cache_dir, allow_fetch=ds.allow_fetch)
    train = fashion_mnist.load_split(folder, "train")
    test = fashion_mnist.load_split(folder, "test")
    train_idx = fashion_mnist.balanced_subset(train.labels, ds.train_per_class, ds.seed)
    train_images, train_labels = train.images[train_idx], train.labels[train_idx].astype(np.int64)
    if ds.queries == "validation":  # train images that are not references: never the test split
        rest = np.setdiff1d(np.arange(len(train.labels)), train_idx)
        query_idx = rest[fashion_mnist.balanced_subset(train.labels[rest], ds.test_per_class, ds.seed + 1)]
        test_images, test_labels = train.images[query_idx], train.labels[query_idx].astype(np.int64)
    else:
        test_idx = fashion_mnist.balanced_subset(test.labels, ds.test_per_class, ds.seed)
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
    model: DinoVisionTransformer, bundle: BackboneBundle, data: EvalData, cfg: EvaluateConfig, cache_dir: Path,
    per_query: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """The protocols' metrics; ``per_query``, when given, receives each query's k-NN hits (see protocols)."""
    fingerprint = model_fingerprint(model)  # once: hashing a ViT-g's weights takes seconds
    train = backbone_features(model, bundle, data.train_images, "train", data.version, cfg, cache_dir, fingerprint)
    test = backbone_features(model, bundle, data.test_images, "test", data.version, cfg, cache_dir, fingerprint)
    return protocols(train, test, data, cfg, per_query)


def evaluate_pixels(data: EvalData, cfg: EvaluateConfig) -> dict[str, float]:
    # No cache: flattening is cheaper than reading a cache entry. One "block", no pooled tokens.
    train = FeatureSet(pixel_features(data.train_images)[:, None])
    test = FeatureSet(pixel_features(data.test_images)[:, None])
    return protocols(train, test, data, cfg)


def protocols(train: FeatureSet, test: FeatureSet, data: EvalData, cfg: EvaluateConfig,
              per_query: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """k-NN, the linear grid and logistic regression; ``per_query`` (if given) gets the k-NN metrics'
    per-query hits, the paired samples of a champion / challenger interval."""
    metrics, hits = knn_evaluate(train.cls, data.train_labels, test.cls, data.test_labels, ks=cfg.ks,
                                 temperature=cfg.temperature, num_classes=NUM_CLASSES)
    if per_query is not None:
        per_query.update(hits)
    if cfg.linear.enabled:
        result: dict[str, Any] = linear_probe(
            train, data.train_labels, test, data.test_labels, learning_rates=cfg.linear.learning_rates,
            epochs=cfg.linear.epochs, batch_size=cfg.linear.batch_size, val_fraction=cfg.linear.val_fraction,
            seed=cfg.seed, num_classes=NUM_CLASSES, standardize=cfg.linear.standardize,
            min_steps=cfg.linear.min_steps)
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


def knn_sweep(metrics: dict[str, float], ks: list[int]) -> list[dict[str, float]]:
    return [{"k": int(k), "top1": round(float(metrics[f"knn_top1_k{k}"]), 6)} for k in sorted(set(ks))]


def write_json(path: Path, payload: object) -> Path:
    """A DVC metrics / plots file, written to a temp file and renamed into place (never half-written)."""
    write_text_atomic(json.dumps(payload, indent=2, sort_keys=True) + "\n", path)
    return path


# ---------------------------------------------------------------- champion / challenger


class EvaluationFailed(RuntimeError):
    """One side of a champion / challenger round could not be evaluated; no alias was moved."""

    def __init__(self, role: str, version: str, cause: BaseException) -> None:
        super().__init__(f"evaluation of the {role} (version {version}) failed: {cause!r}; no alias was moved")
        self.role, self.version = role, version


@dataclass(frozen=True)
class PromotionOutcome:
    name: str
    champion_version: str | None  # before the round
    challenger_version: str | None
    decision: Decision | None  # None when there was nothing to compare (no challenger, or the same version)
    evaluations: dict[str, EvaluateOutputs]  # by role: "champion", "challenger"

    @property
    def champion_after(self) -> str | None:
        promoted = self.decision is not None and self.decision.promote
        return self.challenger_version if promoted else self.champion_version

    def summary(self) -> dict[str, object]:
        """JSON-ready: versions, the decision with reasons and numbers, each side's own metrics and run."""
        decision = self.decision
        return {
            "model_name": self.name,
            "champion_before": self.champion_version,
            "challenger": self.challenger_version,
            "champion_after": self.champion_after,
            "decision": None if decision is None else decision.label,
            "reasons": [] if decision is None else decision.reasons,
            "numbers": {} if decision is None else decision.numbers,
            "interval": None if decision is None or decision.interval is None else decision.interval.as_numbers(),
            "metrics": {role: model_metrics(out.metrics) for role, out in self.evaluations.items()},
            "mlflow_run_ids": {role: out.run_id for role, out in self.evaluations.items()},
        }


def run_promotion(context: StageContext, cfg: EvaluateConfig, model_name: str | None = None) -> PromotionOutcome:
    """Evaluate ``champion`` and ``challenger`` of ``model_name``, decide, and apply the decision.

    Both aliases are resolved to version numbers first, so an alias moved by someone else during the
    round changes nothing here. An absent alias is skipped. A failed evaluation is tagged on its version
    (``promotion.decision=evaluation_failed``) and raised as EvaluationFailed: no alias moves."""
    name = model_name or cfg.schedule.model_name
    policy = cfg.promotion
    configure(context.tracking)  # the registry of this project, before any lookup
    client = default_client()
    champion_v, challenger_v = (version_by_alias(client, name, alias)
                                for alias in (policy.champion_alias, policy.challenger_alias))
    versions = {role: str(v.version) for role, v in (("champion", champion_v), ("challenger", challenger_v))
                if v is not None}
    if versions.get("challenger") == versions.get("champion"):
        versions.pop("challenger", None)  # one version behind both aliases: nothing to compare
    evaluations: dict[str, EvaluateOutputs] = {}
    for role, version in versions.items():  # champion first: the challenger's report then shows fresh numbers
        try:
            evaluations[role] = run_evaluate(context, round_config(cfg, context, name, version, role))
        except Exception as exc:
            record_failure(client, name, version, role, exc)
            raise EvaluationFailed(role, version, exc) from exc
    decision = None
    if "challenger" in evaluations:
        champion = evaluations.get("champion")
        challenger = evaluations["challenger"]
        interval = None if champion is None else primary_interval(champion, challenger, policy)
        decision = decide(model_metrics(champion.metrics) if champion else None,
                          model_metrics(challenger.metrics), policy, interval)
        apply_decision(client, name, decision, versions.get("champion"), versions["challenger"], policy)
    return PromotionOutcome(name, versions.get("champion"), versions.get("challenger"), decision, evaluations)


def primary_interval(champion: EvaluateOutputs, challenger: EvaluateOutputs,
                     policy: PromotionPolicy) -> Interval | None:
    """The paired bootstrap interval of the primary metric's improvement, when both sides have its
    per-query outcomes on the same queries (k-NN metrics do; probe and suite metrics do not)."""
    metric = policy.primary_metric
    if metric not in champion.per_query or metric not in challenger.per_query:
        return None
    if champion.data_version != challenger.data_version:
        raise ValueError(f"champion and challenger were scored on different queries ({champion.data_version} vs "
                         f"{challenger.data_version}): no paired comparison")
    a, b = champion.per_query[metric], challenger.per_query[metric]
    if not policy.higher_is_better.get(metric, True):
        a, b = -a.astype(np.float64), -b.astype(np.float64)  # improvement = champion - challenger
    return paired_bootstrap(a, b, policy.bootstrap_resamples, policy.confidence, policy.bootstrap_seed)


def round_config(cfg: EvaluateConfig, context: StageContext, name: str, version: str, role: str) -> EvaluateConfig:
    """The stage config for one side of a round: the pinned version, the policy's query split (by default
    validation queries from the train split, never the test split), reports outside metrics/ (which
    belong to the DVC stage), and the champion column only on the challenger's report."""
    reports = context.state / "scheduled-eval"
    policy = cfg.promotion
    dataset = dataclasses.replace(cfg.dataset, queries=policy.split, test_per_class=policy.queries_per_class)
    return dataclasses.replace(
        cfg, model=version_uri(name, version), dataset=dataset,
        metrics_path=str(reports / f"{role}.json"), plots_path=str(reports / f"{role}_knn_sweep.json"),
        champion=alias_uri(name, cfg.promotion.champion_alias) if role == "challenger" else "",
    )
