"""The curate stage end to end: demo pool, pipeline, outputs, pictures and one MLflow run (SQLite store)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from components.config.loader import ConfigError
from components.curation.config import BalanceSection, CurateConfig, load_curate_config
from components.stages.context import make_context
from components.stages.curate import run_curate
from tests.test_curation_demo import small_demo

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_load_and_bad_ones_are_refused(tmp_path: Path) -> None:
    cfg = load_curate_config(REPO_ROOT / "params" / "curate.yaml")
    assert cfg.demo.enabled and cfg.embed.backbone.startswith("pixels:") and cfg.outputs.split == "train"
    bad = tmp_path / "bad.yaml"
    bad.write_text("curate:\n  retrieval:\n    mode: everything\n")
    with pytest.raises(ConfigError, match=r"retrieval\.mode"):
        load_curate_config(bad)
    no_pool = tmp_path / "no_pool.yaml"
    no_pool.write_text("curate:\n  demo:\n    enabled: false\n")
    with pytest.raises(ConfigError, match=r"ingest\.pool"):
        load_curate_config(no_pool)


def stage_config(tmp_path: Path) -> CurateConfig:
    cfg = load_curate_config(REPO_ROOT / "params" / "curate.yaml")
    cfg.demo = small_demo("curate-demo")
    cfg.ingest.workers = cfg.embed.decode_workers = 2
    cfg.balance = BalanceSection(levels=[6, 2], target_size=20, n_iter=10, resampling_steps=2)
    cfg.outputs.work_dir = str(tmp_path / "work")
    return cfg


def test_curate_stage_writes_outputs_and_one_mlflow_run(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    context = make_context(root=tmp_path)
    outputs = run_curate(context, stage_config(tmp_path))

    manifest = pl.read_parquet(tmp_path / "data" / "curated" / "manifest.parquet")
    rejects = pl.read_parquet(tmp_path / "data" / "curated" / "rejects.parquet")
    stats = json.loads((tmp_path / "metrics" / "curate.json").read_text())["curate"]
    assert manifest.height == 20 and stats["steps"]["manifest"] == 20
    assert stats["reconciled"] and stats["steps"]["listed"] == manifest.height + rejects.height
    assert stats["demo"]["dup_recall_exact"] == 1.0 and stats["demo"]["manifest_fashion_share"] >= 0.9
    assert set(outputs.pictures) == {"duplicates", "clusters", "calibration"}  # the demo params calibrate
    with Image.open(outputs.pictures["clusters"]) as picture:
        assert picture.height == 2 * 68 + 4  # two top-level clusters, one row each
    assert "Reconciled" in outputs.report_path.read_text()

    from mlflow import MlflowClient

    client = MlflowClient()
    run = client.get_run(outputs.run_id)
    assert run.data.tags["dinoflow.stage"] == "curate"
    assert run.data.tags["dinoflow.curate.embedder"] == "pixels:32"
    assert run.data.params["curate.near_dedup.threshold"] == "0.96"
    assert run.data.metrics["count.manifest"] == 20.0 and run.data.metrics["reconciled"] == 1.0
    assert run.data.metrics["rejected.exact_duplicate"] == 4.0
    assert run.data.metrics["demo.dup_precision_near"] == pytest.approx(stats["demo"]["dup_precision_near"])
    artifacts = {a.path for a in client.list_artifacts(outputs.run_id, "curate")}
    assert artifacts == {"curate/curate.json", "curate/report.md", "curate/duplicates.png", "curate/clusters.png",
                         "curate/calibration.png"}
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.name == "curated-manifest"
    assert run.data.tags["dinoflow.data.curated-manifest.rows"] == "20"
    assert inputs[0].dataset.source and "manifest.parquet" in inputs[0].dataset.source

    # the same params again: the demo is not rebuilt, every step is reused, the manifest is identical
    before = (tmp_path / "data" / "curated" / "manifest.parquet").read_bytes()
    again = run_curate(context, stage_config(tmp_path))
    assert (tmp_path / "data" / "curated" / "manifest.parquet").read_bytes() == before
    assert again.run_id != outputs.run_id
