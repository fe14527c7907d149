"""Lineage: DVC stage hashes equal what ``dvc.lock`` records, parent/child runs, manifest dataset inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from components.tracking import TrackingTarget, log_manifest_input, pipeline_run, stage_run
from components.tracking.lineage import PARENT_RUN_ENV, dvc_stage_tags

DVC = str(Path(sys.executable).with_name("dvc"))

DVC_YAML = {
    "stages": {
        "make": {
            "cmd": "python -c \"open('out.txt','w').write(open('data/in.txt').read().upper())\"",
            "deps": ["data/in.txt", "code"],
            "params": [{"params.yaml": ["lr"]}],
            "outs": ["out.txt"],
        }
    }
}


def dvc_project(root: Path) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "code").mkdir()
    (root / "data" / "in.txt").write_text("hello\n")
    (root / "code" / "step.py").write_text("print('step')\n")
    (root / "params.yaml").write_text("lr: 0.5\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([DVC, "init", "--no-scm", "-q"], cwd=root, check=True, env=env)
    return root


def target(tmp_path: Path, root: Path | None = None) -> TrackingTarget:
    return TrackingTarget(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="lineage",
                          artifact_root=(tmp_path / "artifacts").as_uri(), root=root)


def test_dep_hashes_equal_what_dvc_lock_records(tmp_path: Path) -> None:
    root = dvc_project(tmp_path / "proj")
    tags = dvc_stage_tags(root, "make")
    assert tags["dvc.stage"] == "make" and len(tags["dvc.stage_hash"]) == 64
    subprocess.run([DVC, "repro", "-q"], cwd=root, check=True, env={**os.environ, "DVC_NO_ANALYTICS": "1"})
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]["make"]
    recorded = {dep["path"]: dep["md5"] for dep in lock["deps"]}
    assert tags["dvc.dep.data/in.txt"] == recorded["data/in.txt"]
    assert tags["dvc.dep.code"] == recorded["code"]  # a directory hash (.dir suffix), as DVC writes it


def test_stage_hash_follows_data_and_params(tmp_path: Path) -> None:
    root = dvc_project(tmp_path / "proj")
    first = dvc_stage_tags(root, "make")["dvc.stage_hash"]
    assert dvc_stage_tags(root, "make")["dvc.stage_hash"] == first  # stable
    (root / "params.yaml").write_text("lr: 0.25\n")
    second = dvc_stage_tags(root, "make")["dvc.stage_hash"]
    (root / "data" / "in.txt").write_text("other\n")
    third = dvc_stage_tags(root, "make")["dvc.stage_hash"]
    assert len({first, second, third}) == 3


def test_missing_stage_or_dvc_yaml_is_a_note_not_an_error(tmp_path: Path) -> None:
    root = dvc_project(tmp_path / "proj")
    assert "no stage named 'other'" in dvc_stage_tags(root, "other")["dvc.lineage_note"]
    assert "no dvc.yaml" in dvc_stage_tags(tmp_path, "make")["dvc.lineage_note"]


def test_stage_runs_are_children_of_the_pipeline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    monkeypatch.delenv(PARENT_RUN_ENV, raising=False)
    root = dvc_project(tmp_path / "proj")
    tracking = target(tmp_path, root)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    with pipeline_run(tracking, {"git_sha": "abc"}) as parent:
        assert os.environ[PARENT_RUN_ENV] == parent
        with stage_run(tracking, "make", {"lr": 0.5}) as run:
            child = run.info.run_id
    assert PARENT_RUN_ENV not in os.environ  # restored
    client = MlflowClient(tracking.tracking_uri)
    tags = client.get_run(child).data.tags
    assert tags["mlflow.parentRunId"] == parent
    assert tags["dvc.stage"] == "make" and tags["dvc.exp_name"] == "exp-1"
    assert tags["dvc.dep.data/in.txt"] == dvc_stage_tags(root, "make")["dvc.dep.data/in.txt"]
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED" and parent_run.data.tags["git_sha"] == "abc"


def test_a_failed_pipeline_marks_its_parent_run_failed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    tracking = target(tmp_path)
    with pytest.raises(RuntimeError, match="stage broke"), pipeline_run(tracking) as parent:
        raise RuntimeError("stage broke")
    assert MlflowClient(tracking.tracking_uri).get_run(parent).info.status == "FAILED"


def test_manifest_is_logged_as_a_dataset_input_with_its_md5(tmp_path: Path) -> None:
    import hashlib

    from mlflow import MlflowClient

    manifest = tmp_path / "manifest.parquet"
    pl.DataFrame({"id": ["a", "b"], "uri": ["file:///a.png", "file:///b.png"]}).write_parquet(manifest)
    tracking = target(tmp_path)
    with stage_run(tracking, "pretrain", {"x": 1}) as run:
        digest = log_manifest_input(manifest, "pretrain-manifest")
    assert digest == hashlib.md5(manifest.read_bytes()).hexdigest()
    got = MlflowClient(tracking.tracking_uri).get_run(run.info.run_id)
    inputs = got.inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["pretrain-manifest"]
    assert inputs[0].dataset.digest == digest and inputs[0].tags[0].value == "training"
    assert got.data.tags["dinoflow.data.pretrain-manifest.rows"] == "2"
