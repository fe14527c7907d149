"""The pretrain stage end to end: train on a manifest, export the teacher, register it in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from components.models.export import load_backbone
from components.stages.context import make_context
from components.stages.pretrain import run_pretrain
from tests.test_pretrain_engine import tiny_config, write_pool


@pytest.mark.slow
def test_pretrain_stage_exports_and_registers_the_teacher(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("")
    cfg = tiny_config(write_pool(tmp_path), tmp_path / "out", iterations=4)
    cfg.publish.registered_model_name = "test-pretrain-backbone"
    context = make_context(root=tmp_path)
    outputs = run_pretrain(context, cfg)
    assert outputs.result.finished and outputs.backbone_dir is not None and outputs.run_id
    bundle = load_backbone(outputs.backbone_dir)
    assert bundle.metadata["step"] == 4
    assert "mlflow_run_id" not in bundle.metadata  # a DVC output holds nothing that changes on every run
    x = torch.randn(1, 3, 28, 28)
    assert bundle.model(x).shape == (1, 64)

    from mlflow import MlflowClient

    client = MlflowClient()
    version = client.get_model_version_by_alias("test-pretrain-backbone", "challenger")
    assert str(version.version) == outputs.model_version and version.run_id == outputs.run_id
    run = client.get_run(outputs.run_id)
    assert "total_loss" in run.data.metrics and "images_per_second" in run.data.metrics
    assert run.data.params["pretrain.backbone.arch"] == "vit_pico"
    assert run.data.tags["dinoflow.stage"] == "pretrain"
    artifacts = {a.path for a in client.list_artifacts(outputs.run_id, "backbone")}
    assert artifacts == {"backbone/config.json", "backbone/model.safetensors"}
    checkpoint_files = {a.path for a in client.list_artifacts(outputs.run_id, "checkpoint")}
    assert "checkpoint/COMMITTED" in checkpoint_files and "checkpoint/.metadata" in checkpoint_files
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["pretrain"]
    assert metrics["final_step"] == 4
