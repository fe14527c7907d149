"""``dinoflow models list|show|pull``, ``dinoflow export`` from the registry and ``load(models:/...)``
against a real SQLite MLflow registry in tmp_path, with both kinds of registered versions: the plain
backbone folder (``pretrain``'s ``register``) and the pyfunc model (``log_backbone_pyfunc``)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from components.models import BackboneConfig, build_backbone
from components.models.export import save_backbone
from components.registry import load
from components.registry.publish import log_backbone_pyfunc
from components.registry.publish import register_backbone as register
from components.registry.resolve import resolve_model_uri
from flows.cli_models import add_model_commands

NAME = "registry-test-backbone"


@dataclass(frozen=True)
class Registry:
    backbone_dir: Path
    pool: pd.DataFrame
    pretrain_run: str
    distill_run: str


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="dinoflow")
    add_model_commands(top.add_subparsers(dest="command", required=True))
    return top


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    args = parser().parse_args(argv)
    assert args.handler(args) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Version 1: plain folder from a 'pretrain' run with full lineage (alias challenger).
    Version 2: pyfunc model from a 'distill' run with teacher tags only (alias champion)."""
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)  # what `dinoflow models` reads, through params/project.yaml
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        mlflow.set_experiment("registry-test")
        config = BackboneConfig(arch="vit_pico", patch_size=4, img_size=28)
        torch.manual_seed(5)
        folder = save_backbone(build_backbone(config), config, root / "backbone", mean=(0.4,) * 3, std=(0.3,) * 3)
        pool = pd.DataFrame({"key": ["a.png", "b.png"], "sha256": ["00ff", "ff00"], "label": [1, 2]})
        with mlflow.start_run(run_name="pretrain", tags={
                "git_sha": "0123abcd", "git_dirty": "false", "dvc.stage": "pretrain",
                "dvc.dep.data/demo/pool.parquet": "md5:1234", "prefect.flow_run_id": "flow-run-7",
                "dinoflow.stage": "pretrain"}) as pretrain:
            mlflow.log_input(mlflow.data.from_pandas(pool, name="demo-pool"), context="training")
            mlflow.log_artifacts(str(folder), artifact_path="backbone")
        register(NAME, pretrain.info.run_id)  # version 1, alias challenger
        with mlflow.start_run(run_name="distill", tags={"dinoflow.teacher_uri": f"models:/{NAME}/1"}) as distill:
            log_backbone_pyfunc(folder, registered_model_name=NAME)  # version 2
        mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", "2")
        try:
            yield Registry(folder, pool, pretrain.info.run_id, distill.info.run_id)
        finally:
            mlflow.set_tracking_uri(previous)
            mlflow.set_registry_uri(previous)


@pytest.fixture
def tracking(registry: Registry, monkeypatch: pytest.MonkeyPatch) -> Registry:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow.get_tracking_uri())
    return registry


def test_models_list(tracking: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    listed = run_cli(["models", "list"], capsys)
    (model,) = [m for m in listed["models"] if m["name"] == NAME]
    assert model["aliases"] == {"challenger": "1", "champion": "2"}
    assert [v["version"] for v in model["versions"]] == ["2", "1"]
    assert model["versions"][0]["tags"]["dinoflow.format"] == "pyfunc"
    assert model["versions"][1]["run_id"] == tracking.pretrain_run and model["versions"][1]["aliases"] == ["challenger"]


def test_models_show_prints_lineage_and_tolerates_missing_tags(
        tracking: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow

    shown = run_cli(["models", "show", f"{NAME}@challenger"], capsys)
    assert (shown["version"], shown["uri"]) == ("1", f"models:/{NAME}@challenger")
    tags = shown["lineage"]["tags"]
    assert tags["code"] == {"git_dirty": "false", "git_sha": "0123abcd"}
    assert tags["dvc"] == {"dvc.dep.data/demo/pool.parquet": "md5:1234", "dvc.stage": "pretrain"}
    assert tags["orchestration"] == {"prefect.flow_run_id": "flow-run-7"}
    expected = mlflow.data.from_pandas(tracking.pool, name="demo-pool")
    (dataset,) = shown["lineage"]["datasets"]
    assert (dataset["name"], dataset["digest"], dataset["context"]) == ("demo-pool", expected.digest, "training")
    assert dataset["source_type"] == expected.source._get_source_type()
    # Version 2's run recorded only a teacher: the other groups are simply absent.
    second = run_cli(["models", "show", f"models:/{NAME}/2"], capsys)
    assert second["aliases"] == ["champion"] and second["lineage"]["run_id"] == tracking.distill_run
    assert second["lineage"]["tags"]["teacher"] == {"dinoflow.teacher_uri": f"models:/{NAME}/1"}
    assert not {"code", "dvc", "orchestration"} & set(second["lineage"]["tags"])
    assert second["lineage"]["datasets"] == []


def test_models_pull_both_layouts(tracking: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = (tracking.backbone_dir / "model.safetensors").read_bytes()
    plain = run_cli(["models", "pull", f"{NAME}@challenger", "--dest", str(tmp_path / "v1")], capsys)
    assert plain["kind"] == "backbone" and plain["files"] == ["config.json", "model.safetensors"]
    assert (tmp_path / "v1" / "model.safetensors").read_bytes() == original
    pyfunc = run_cli(["models", "pull", f"{NAME}@champion", "--dest", str(tmp_path / "v2")], capsys)
    assert pyfunc["kind"] == "pyfunc" and "MLmodel" in pyfunc["files"]
    assert not [f for f in pyfunc["files"] if f.endswith((".pkl", ".pickle", ".cloudpickle"))]
    assert (Path(pyfunc["backbone_dir"]) / "model.safetensors").read_bytes() == original
    refused = parser().parse_args(["models", "pull", f"{NAME}@champion", "--dest", str(tmp_path / "v1")])
    assert refused.handler(refused) == 2 and "not empty" in capsys.readouterr().err
    assert (tmp_path / "v1" / "model.safetensors").read_bytes() == original  # untouched
    forced = run_cli(["models", "pull", f"{NAME}@champion", "--dest", str(tmp_path / "v1"), "--force"], capsys)
    assert forced["kind"] == "pyfunc"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"


def test_load_and_resolve_registry_versions(tracking: Registry, tmp_path: Path) -> None:
    reference = load(tracking.backbone_dir)
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    for uri, kind in ((f"models:/{NAME}@challenger", "backbone"), (f"models:/{NAME}/2", "pyfunc")):
        resolved = resolve_model_uri(uri, tmp_path / "cache")
        assert resolved.layout == kind and resolved.name == NAME
        bundle = load(uri, cache_dir=tmp_path / "cache")
        assert bundle.mean == (0.4,) * 3 and bundle.metadata["registry"]["version"] == resolved.version
        with torch.no_grad():
            torch.testing.assert_close(bundle.model(x), reference.model(x), atol=0, rtol=0)
    # downloaded once per version: resolving again adds no folder
    before = sorted(p.name for p in (tmp_path / "cache" / NAME).iterdir())
    assert resolve_model_uri(f"models:/{NAME}/1", tmp_path / "cache").directory.name in before
    assert sorted(p.name for p in (tmp_path / "cache" / NAME).iterdir()) == before == sorted(before)
    assert len(before) == 2


def test_export_from_the_registry(tracking: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = run_cli(["export", "--model", f"models:/{NAME}@champion", "--format", "onnx",
                   "--out", str(tmp_path / "model.onnx")], capsys)
    assert out["outputs"] == ["cls", "patch_tokens"] and out["max_abs_diff"] <= 1e-4
    assert (tmp_path / "model.onnx").is_file()


def run_fresh_python(script: str, tracking_uri: str, cwd: Path) -> dict:  # type: ignore[type-arg]
    """``script`` in a new interpreter that never ran the CLI: its environment is the machine's quiet,
    offline defaults (telemetry off) plus the one documented variable, MLFLOW_TRACKING_URI."""
    import os
    import subprocess
    import sys

    from components.environment import quiet_offline_defaults

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DINOFLOW_"))}
    env.update(quiet_offline_defaults(cwd / "state"))
    env.pop("DINOFLOW_HOME")
    env.update({"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_mlflow_hf_and_timm_load_a_registered_backbone_in_a_fresh_process(
        tracking: Registry, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow
    import numpy as np

    reference = load(tracking.backbone_dir).model
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cls = reference.forward_features(x)["x_norm_clstoken"]
    np.save(tmp_path / "x.npy", x.numpy())
    uri = mlflow.get_tracking_uri()
    # MLflow itself: the pyfunc version answers predict() with the CLS embedding (images in 0..255).
    served = run_fresh_python(
        "import json, mlflow, numpy as np\n"
        f"model = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        "out = model.predict(np.full((2, 28, 28, 3), 128, dtype=np.uint8))\n"
        "print(json.dumps({'shape': list(out.shape)}))\n", uri, tmp_path)
    assert served["shape"] == [2, reference.embed_dim]
    # dinoflow models pull --format hf / timm, then loaded by transformers and by timm alone.
    hf = run_cli(["models", "pull", f"{NAME}@champion", "--dest", str(tmp_path / "hf"), "--format", "hf"], capsys)
    assert hf["max_abs_diff"] <= 1e-4 and "config.json" in hf["files"]
    timm_out = run_cli(["models", "pull", f"{NAME}/1", "--dest", str(tmp_path / "timm"), "--format", "timm"], capsys)
    assert timm_out["files"] == ["model.safetensors", "model.timm.json"]
    loaded = run_fresh_python(
        "import json, numpy as np, torch, timm\n"
        "from transformers import AutoModel\n"
        "x = torch.from_numpy(np.load('x.npy'))\n"
        "hf = AutoModel.from_pretrained('hf').eval()\n"
        "recipe = json.load(open('timm/model.timm.json'))\n"
        "tm = timm.create_model(recipe['model_name'], pretrained=True,\n"
        "                       pretrained_cfg_overlay={'file': 'timm/model.safetensors'}, **recipe['kwargs']).eval()\n"
        "with torch.no_grad():\n"
        "    a = hf(pixel_values=x).last_hidden_state[:, 0]\n"
        "    b = tm.forward_features(x)[:, 0]\n"
        "print(json.dumps({'hf': a.tolist(), 'timm': b.tolist()}))\n", uri, tmp_path)
    for name in ("hf", "timm"):
        torch.testing.assert_close(torch.tensor(loaded[name]), cls, atol=1e-4, rtol=0)
