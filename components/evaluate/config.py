"""Typed parameters of the ``evaluate`` stage (``params/evaluate.yaml``, section ``evaluate``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from components.config.loader import load_config
from components.data import fashion_mnist
from components.evaluate.copydetect import CopyDetectConfig
from components.evaluate.dense import DenseConfig
from components.evaluate.knn import DEFAULT_KS, DEFAULT_TEMPERATURE
from components.evaluate.linear import DEFAULT_C_GRID, DEFAULT_LEARNING_RATES
from components.evaluate.pca_picture import PcaPictureConfig
from components.evaluate.promotion import PromotionPolicy
from components.evaluate.retrieval import RetrievalConfig
from components.registry.uri import parse_source


@dataclass
class EvalDatasetConfig:
    """Fashion-MNIST, the demo eval set: balanced subsets of the official train and test splits."""

    source_dir: str = str(fashion_mnist.INSTALLED_DATA_DIR)
    cache_dir: str = ""  # empty: <state>/cache/fashion-mnist (shared with the data stage)
    train_per_class: int = 200  # 0 = the whole split (6,000 per class): the k-NN / probe reference set
    test_per_class: int = 50  # 0 = the whole split (1,000 per class)
    seed: int = 0
    allow_fetch: bool = True
    # The queries: "test" (the official test split) or "validation": ``test_per_class`` images per class
    # from the train split, disjoint from the references (champion / challenger rounds use it by default,
    # so that choosing between models never looks at the test split).
    queries: Literal["test", "validation"] = "test"

    def validate(self) -> None:
        if self.train_per_class < 0 or self.test_per_class < 0:
            raise ValueError("train_per_class and test_per_class must be >= 0")
        if self.train_per_class == 1:
            raise ValueError("train_per_class must be 0 or >= 2: the probes carve a validation split from train")
        if self.queries == "validation" and (self.train_per_class == 0 or self.test_per_class == 0):
            raise ValueError("validation queries come from the train split beside the references: set both "
                             "train_per_class and test_per_class >= 1")


@dataclass
class LinearConfig:
    """The DINOv2 linear grid (components.evaluate.linear.linear_probe)."""

    enabled: bool = True
    epochs: int = 10
    batch_size: int = 256
    learning_rates: list[float] = field(default_factory=lambda: list(DEFAULT_LEARNING_RATES))
    val_fraction: float = 0.1
    # Departures from the official recipe (docs/evaluation.md): standardise features with the fit
    # split's statistics, and make at least min_steps updates however small the set (official: 12,500).
    standardize: bool = True
    min_steps: int = 1000

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.min_steps < 0:
            raise ValueError("min_steps must be >= 0")
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError("learning_rates must be a non-empty list of positive numbers")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must be in (0, 1)")


@dataclass
class LogregConfig:
    """L2 logistic regression on the last CLS (components.evaluate.linear.logreg_probe)."""

    enabled: bool = True
    c_grid: list[float] = field(default_factory=lambda: list(DEFAULT_C_GRID))
    max_iter: int = 300
    tol: float = 1e-7

    def validate(self) -> None:
        if self.max_iter < 1 or self.tol <= 0:
            raise ValueError("max_iter must be >= 1 and tol > 0")
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ValueError("c_grid must be a non-empty list of positive numbers")


@dataclass
class BaselinesConfig:
    """The floors every report carries (docs/evaluation.md, Baselines), computed by the same protocols."""

    random_init: bool = True  # same architecture, untrained (seeded by EvaluateConfig.seed)
    # The same, with LayerScale off. With the official LayerScale init (1e-5) an untrained ViT's residual
    # branches are ~0, so it maps every image to nearly one CLS token and ``random_init`` sits near chance;
    # this floor (a random ViT with full residual branches) is the one a trained model must clearly beat.
    # Computed only for models that have LayerScale.
    random_no_layerscale: bool = True
    pixels: bool = True  # raw 28x28 pixels, whatever image_size is


@dataclass
class ScheduleConfig:
    """The scheduled champion / challenger evaluation (flows/scheduled_evaluation.py)."""

    model_name: str = "dinoflow-backbone"  # the registered model whose aliases are evaluated
    cron: str = "0 2 * * *"  # nightly at 02:00
    timezone: str = "UTC"
    deployment: str = "nightly-champion-challenger"  # the name flow.serve() gives the local deployment

    def validate(self) -> None:
        if not self.model_name:
            raise ValueError("schedule.model_name must name a registered model")
        if len(self.cron.split()) != 5:
            raise ValueError(f"schedule.cron must have 5 fields (minute hour day month weekday), got {self.cron!r}")


@dataclass
class EvaluateConfig:
    # A backbone folder (relative to the project root) or a registry URI: models:/NAME@ALIAS, models:/NAME/VERSION.
    model: str = "outputs/pretrain/backbone"
    dataset: EvalDatasetConfig = field(default_factory=EvalDatasetConfig)
    image_size: int = 28  # images are resized to this before the backbone (must suit its patch size)
    batch_size: int = 256  # extraction batch
    n_last_blocks: int = 4  # CLS of the last n blocks are kept for the linear grid (clipped to the depth)
    avgpool: bool = True  # also keep the pooled patch tokens (the grid's cls+avgpool heads)
    ks: list[int] = field(default_factory=lambda: list(DEFAULT_KS))
    temperature: float = DEFAULT_TEMPERATURE
    linear: LinearConfig = field(default_factory=LinearConfig)
    logreg: LogregConfig = field(default_factory=LogregConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    seed: int = 0  # validation splits, head init, random-init baseline weights
    device: str = "cpu"
    metrics_path: str = "metrics/eval.json"
    plots_path: str = "metrics/eval_knn_sweep.json"
    cache_dir: str = ""  # empty: <state>/cache/features
    # The registry version shown beside the model in reports (its eval.* tags); empty: no comparison.
    champion: str = "models:/dinoflow-backbone@champion"
    # Optional suites on the model only (not the baselines); off unless params enable them.
    retrieval: RetrievalConfig = field(default_factory=lambda: RetrievalConfig(enabled=False))
    copydetect: CopyDetectConfig = field(default_factory=lambda: CopyDetectConfig(enabled=False))
    dense: DenseConfig = field(default_factory=lambda: DenseConfig(enabled=False))
    pca_picture: PcaPictureConfig = field(default_factory=lambda: PcaPictureConfig(enabled=False))
    promotion: PromotionPolicy = field(default_factory=PromotionPolicy)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> None:
        if not self.model:
            raise ValueError("model must name a backbone folder or a models:/ registry URI")
        parse_source(self.model).require("registry", "path", "hub", "state_dict")  # fail at load time
        if self.champion and parse_source(self.champion).require("registry").alias is None:
            raise ValueError(f"champion must be models:/NAME@ALIAS (or empty), got {self.champion!r}")
        if self.image_size < 1 or self.batch_size < 1 or self.n_last_blocks < 1:
            raise ValueError("image_size, batch_size and n_last_blocks must be >= 1")
        if not self.ks or min(self.ks) < 1:
            raise ValueError("ks must be a non-empty list of positive integers")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")

    @property
    def from_registry(self) -> bool:
        return parse_source(self.model).kind == "registry"


def load_evaluate_config(path: str | Path = "params/evaluate.yaml", overrides: Sequence[str] = ()) -> EvaluateConfig:
    return load_config(EvaluateConfig, path, section="evaluate", overrides=overrides)
