"""The evaluate stage end to end: a backbone folder and its registry version, k-NN + probes + baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.config.loader import ConfigError
from components.evaluate.config import (
    EvaluateConfig,
    LinearConfig,
    LogregConfig,
    load_evaluate_config,
)
from components.models import BackboneConfig, build_backbone
from components.models.export import save_backbone
from components.registry.publish import register_backbone as register
from components.registry.uri import parse_source
from components.stages.context import make_context
from components.stages.evaluate import run_evaluate

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "test-evaluate-backbone"


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny_eval_config(model: str, root: Path) -> EvaluateConfig:
    cfg = EvaluateConfig(model=model, ks=[5, 20], metrics_path="metrics/eval.json",
                         plots_path="metrics/eval_knn_sweep.json", cache_dir=str(root / "features"),
                         linear=LinearConfig(epochs=2, learning_rates=[0.01, 0.1], min_steps=0),
                         logreg=LogregConfig(c_grid=[1.0, 10.0], max_iter=30, tol=1e-4))
    cfg.dataset.train_per_class, cfg.dataset.test_per_class = 20, 10
    return cfg


def test_shipped_params_load() -> None:
    cfg = load_evaluate_config(REPO_ROOT / "params" / "evaluate.yaml")
    assert cfg.model == "outputs/pretrain/backbone" and cfg.baselines.random_init and cfg.baselines.pixels
    assert cfg.linear.standardize and cfg.linear.min_steps > 0
    assert cfg.promotion.primary_metric in {f"knn_top1_k{k}" for k in cfg.ks}
    assert cfg.promotion.higher_is_better.get("depth_rmse") is False
    assert cfg.champion == f"models:/{cfg.schedule.model_name}@{cfg.promotion.champion_alias}"


def test_champion_must_be_an_alias(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluate:\n  champion: models:/x/3\n")
    with pytest.raises(ConfigError, match="champion must be"):
        load_evaluate_config(bad)
    bad.write_text("evaluate:\n  schedule: {cron: '0 2 * *'}\n")
    with pytest.raises(ConfigError, match="5 fields"):
        load_evaluate_config(bad)


@pytest.mark.slow
def test_enabled_suites_add_metrics_and_pictures(tmp_path: Path) -> None:
    """Retrieval and the PCA picture (the cheap suites) wired through the stage: metrics and MLflow pictures."""
    (tmp_path / "pyproject.toml").write_text("")
    torch.manual_seed(4)
    arch = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28)
    save_backbone(build_backbone(arch), arch, tmp_path / "backbone")
    cfg = tiny_eval_config("backbone", tmp_path)
    cfg.baselines.random_init = cfg.baselines.pixels = cfg.baselines.random_no_layerscale = False
    cfg.linear.enabled = cfg.logreg.enabled = False
    cfg.retrieval.enabled, cfg.retrieval.queries_per_class, cfg.retrieval.gallery_per_class = True, 2, 10
    cfg.retrieval.picture_queries, cfg.retrieval.picture_top_k = 2, 3
    cfg.pca_picture.enabled, cfg.pca_picture.photos, cfg.pca_picture.tile = True, ["coffee"], 28
    outputs = run_evaluate(make_context(root=tmp_path), cfg)
    assert 0.0 < outputs.metrics["retrieval_map"] <= 1.0 and "retrieval_recall_at_1" in outputs.metrics
    assert 0.0 <= outputs.metrics["pca_foreground_fraction"] <= 1.0
    report = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert report["retrieval_map"] == pytest.approx(outputs.metrics["retrieval_map"], abs=1e-6)

    from mlflow import MlflowClient

    logged = {f.path for f in MlflowClient().list_artifacts(outputs.run_id, "eval/pictures")}
    assert logged == {"eval/pictures/retrieval.png", "eval/pictures/pca.png"}


def test_registry_uris_parse_and_bad_ones_are_refused(tmp_path: Path) -> None:
    assert parse_source("models:/a-b@champion").alias == "champion"
    assert parse_source("models:/a-b/3").version == "3"
    with pytest.raises(ValueError, match="NAME@ALIAS"):
        parse_source("models:/only-a-name")
    bad = tmp_path / "bad.yaml"
    bad.write_text("evaluate:\n  model: models:/x/latest\n")
    with pytest.raises(ConfigError, match="NAME@ALIAS"):
        load_evaluate_config(bad)


@pytest.mark.slow
def test_evaluate_folder_then_registry_version(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    torch.manual_seed(3)
    arch = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28)
    folder = save_backbone(build_backbone(arch), arch, tmp_path / "backbone")
    context = make_context(root=tmp_path)

    # 1. the folder
    outputs = run_evaluate(context, tiny_eval_config("backbone", tmp_path))
    report = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    for key in ("knn_top1_k5", "knn_top5_k20", "linear_top1", "logreg_top1",
                "baseline_random_init_knn_top1_k20", "baseline_pixels_knn_top1_k20",
                "baseline_pixels_linear_top1", "baseline_random_init_logreg_top1",
                "baseline_random_no_layerscale_knn_top1_k20"):
        assert key in report, key
    assert all(0.0 <= value <= 1.0 for value in report.values())
    assert report["baseline_pixels_knn_top1_k20"] > 0.4  # raw pixels are far above chance on Fashion-MNIST
    sweep = json.loads((tmp_path / "metrics" / "eval_knn_sweep.json").read_text())
    assert sweep == [{"k": 5, "top1": report["knn_top1_k5"]}, {"k": 20, "top1": report["knn_top1_k20"]}]

    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(outputs.run_id)
    assert run.data.tags["dinoflow.stage"] == "evaluate"
    assert run.data.tags["dinoflow.eval.model_uri"] == "backbone"
    assert run.data.metrics["knn_top1_k20"] == pytest.approx(outputs.metrics["knn_top1_k20"])
    assert "random_init.linear_top1" in run.data.metrics and "pixels.logreg_top1" in run.data.metrics
    assert run.data.params["evaluate.dataset.train_per_class"] == "20"
    cached = sorted(p.name for p in (tmp_path / "features").iterdir())
    # (model, random init, random init without LayerScale) x (train, test) x (.npy, .json)
    assert len(cached) == 12

    # 2. the same weights as a registry version, by alias
    import mlflow

    with mlflow.start_run(run_name="fake-pretrain") as source_run:
        mlflow.log_artifacts(str(folder), artifact_path="backbone")
    version = register(MODEL_NAME, source_run.info.run_id)
    registered = run_evaluate(context, tiny_eval_config(f"models:/{MODEL_NAME}@challenger", tmp_path))
    assert registered.model.version == version and registered.model.name == MODEL_NAME
    # same weights, same data: every feature came from the cache, and the numbers are the same
    assert sorted(p.name for p in (tmp_path / "features").iterdir()) == cached
    assert registered.metrics == pytest.approx(outputs.metrics)
    tags = client.get_model_version(MODEL_NAME, version).tags
    assert float(tags["eval.knn_top1_k20"]) == pytest.approx(registered.metrics["knn_top1_k20"], abs=1e-6)
    assert tags["eval.run_id"] == registered.run_id and "eval.random_init.knn_top1_k20" not in tags
    run_tags = client.get_run(registered.run_id).data.tags
    assert run_tags["dinoflow.eval.model_version"] == version
    assert run_tags["dinoflow.eval.model_name"] == MODEL_NAME
