"""The whole chain on a tiny slice, driven twice: by ``dvc repro`` and by the Prefect ``pipeline`` flow.

A fresh project folder (git + DVC, the shipped dvc.yaml, tiny params) runs data -> curate -> pretrain
-> distill -> evaluate. Then the registry, the lineage tags (git SHA, DVC stage hashes equal to
dvc.lock, the manifest digest, the teacher of the student), the metrics and the parent/child MLflow
runs of the Prefect pipeline are checked through MLflow itself and through ``dinoflow models show``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEACHER, STUDENT = "e2e-backbone", "e2e-student"
HEAD = "{n_prototypes: 64, hidden_dim: 32, bottleneck_dim: 16}"

DATA = """\
demo:
  manifest: data/demo/pool.parquet
  metrics: metrics/data.json
  fashion_mnist: {train_per_class: 4, test_per_class: 1}
  photos: [coffee]
"""

TRAIN_COMMON = f"""\
  data: {{manifest: data/curated/manifest.parquet, splits: [train], batch_size_per_rank: 4, num_workers: 0, seed: 0}}
  crops: {{global_crops_size: 28, local_crops_size: 12, local_crops_number: 2}}
  objective:
    precision: fp32
    dino: {{head: {HEAD}}}
    ibot: {{head: {HEAD}}}
    teacher: {{warmup_teacher_temp_iters: 1}}
    optim: {{iterations: 3, warmup_iters: 1, freeze_last_layer_iters: 1}}
"""

PRETRAIN = f"""\
pretrain:
{TRAIN_COMMON}  backbone: {{arch: vit_pico, patch_size: 4, img_size: 28, drop_path_rate: 0.0, layerscale_init: 0.1}}
  run: {{output_dir: outputs/pretrain, log_every: 1, device: cpu}}
  checkpoint: {{every: 3, keep_last: 1}}
  publish: {{registered_model_name: {TEACHER}}}
"""

DISTILL = f"""\
distill:
  teacher: {{source: "models:/{TEACHER}@challenger", mode: auto}}
{TRAIN_COMMON}  backbone: {{arch: vit_femto, patch_size: 4, img_size: 28, drop_path_rate: 0.0, layerscale_init: 0.1}}
  run: {{output_dir: outputs/distill, log_every: 1, device: cpu}}
  checkpoint: {{every: 3, keep_last: 1}}
  publish: {{registered_model_name: {STUDENT}}}
"""

EVALUATE = """\
evaluate:
  model: outputs/pretrain/backbone
  dataset: {train_per_class: 5, test_per_class: 2, seed: 0}
  image_size: 28
  batch_size: 64
  ks: [5]
  linear: {enabled: true, epochs: 2, learning_rates: [0.1], min_steps: 0}
  logreg: {enabled: true, c_grid: [1.0], max_iter: 20, tol: 1.0e-3}
  baselines: {random_init: true, pixels: true}
  champion: ""
  retrieval: {enabled: true, queries_per_class: 2, gallery_per_class: 5, ks: [1, 5]}
  copydetect: {enabled: false}
  dense: {enabled: false}
  pca_picture: {enabled: false}
  device: cpu
  metrics_path: metrics/eval.json
  plots_path: metrics/eval_knn_sweep.json
"""


def curate_params() -> str:
    shipped = yaml.safe_load((REPO / "params" / "curate.yaml").read_text())
    cfg = shipped["curate"]
    cfg["demo"].update({"fashion_per_class": 8, "digits": 12, "textures": 6, "exact_copies": 3, "near_copies": 6,
                        "seeds_per_class": 2, "eval_per_class": 2, "eval_copies": 3})
    cfg["balance"].update({"levels": [6, 2], "target_size": 30})
    return yaml.safe_dump(shipped)


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done.stdout


def make_project(root: Path) -> dict[str, str]:
    """A git + DVC project with the shipped dvc.yaml, a copy of the code it hashes, and tiny params."""
    root.mkdir()
    shutil.copytree(REPO / "components", root / "components", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "pyproject.toml").write_text("")
    (root / ".gitignore").write_text(".dinoflow/\n")
    params = root / "params"
    params.mkdir()
    shutil.copy(REPO / "params" / "project.yaml", params / "project.yaml")
    for name, text in {"data": DATA, "curate": curate_params(), "pretrain": PRETRAIN, "distill": DISTILL,
                       "evaluate": EVALUATE}.items():
        (params / f"{name}.yaml").write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DINOFLOW_"))}
    env.update({"PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t"})
    run(["git", "init", "-q"], root, env)
    run([str(BIN / "dvc"), "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-q", "-m", "tiny project"], root, env)
    return env


def tracking(root: Path) -> object:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / '.dinoflow' / 'mlflow' / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_dvc_repro_then_prefect_pipeline_register_models_with_lineage(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    root = tmp_path / "project"
    env = make_project(root)
    # dvc repro: each stage is `dinoflow <stage>`; local engine here (the Prefect path is the pipeline below).
    run([str(BIN / "dvc"), "repro", "-q"], root, {**env, "DINOFLOW_ENGINE": "local"})

    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"data", "curate", "pretrain", "distill", "evaluate"}
    metrics = json.loads((root / "metrics" / "eval.json").read_text())
    assert 0.0 <= metrics["knn_top1_k5"] <= 1.0 and "baseline_pixels_knn_top1_k5" in metrics
    assert "retrieval_map" in metrics
    curate = json.loads((root / "metrics" / "curate.json").read_text())["curate"]
    assert curate["reconciled"] and curate["steps"]["manifest"] == 30

    client = tracking(root)
    assert isinstance(client, MlflowClient)
    teacher = client.get_model_version_by_alias(TEACHER, "challenger")
    student = client.get_model_version_by_alias(STUDENT, "challenger")
    assert student.tags["dinoflow.teacher_name"] == TEACHER
    assert student.tags["dinoflow.teacher_version"] == str(teacher.version)
    assert student.tags["dinoflow.distill_mode"] == "heads"  # the teacher's checkpoint artifact has its heads

    pretrain_run = client.get_run(teacher.run_id)
    tags = pretrain_run.data.tags
    git_sha = run(["git", "rev-parse", "HEAD"], root, env).strip()
    assert tags["git_sha"] == git_sha and tags["dvc.stage"] == "pretrain"
    manifest_md5 = next(d["md5"] for d in lock["pretrain"]["deps"] if d["path"] == "data/curated/manifest.parquet")
    assert tags["dvc.dep.data/curated/manifest.parquet"] == manifest_md5  # the same data version as dvc.lock
    assert [i.dataset.digest for i in pretrain_run.inputs.dataset_inputs] == [manifest_md5]

    # `dinoflow models show` prints the lineage back to the manifest digest and the git SHA.
    shown = run([str(BIN / "dinoflow"), "models", "show", f"{TEACHER}@challenger"], root, env)
    assert git_sha in shown and manifest_md5 in shown

    # The Prefect pipeline over the same stages: one parent MLflow run, a child run per stage.
    outputs = json.loads(_pipeline(root, env))
    parent = str(outputs["mlflow_parent_run_id"])
    children = client.search_runs([pretrain_run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["dinoflow.stage"] for r in children) == ["curate", "data", "distill", "evaluate",
                                                                       "pretrain"]
    assert all("prefect.flow_run_id" in r.data.tags for r in children)
    assert client.get_run(parent).info.status == "FINISHED"
    # Rerunning found finished checkpoints: new versions of both models, the student still through the heads.
    assert int(client.get_model_version_by_alias(TEACHER, "challenger").version) == int(teacher.version) + 1
    assert client.get_model_version_by_alias(STUDENT, "challenger").tags["dinoflow.distill_mode"] == "heads"
    with sqlite3.connect(root / ".dinoflow" / "prefect" / "prefect.db") as db:
        states = dict(db.execute("select f.name, r.state_type from flow_run r join flow f on f.id = r.flow_id "
                                 "where f.name = 'pipeline'").fetchall())
        artifact = db.execute("select data from artifact where key = 'pipeline'").fetchone()[0]
    assert states == {"pipeline": "COMPLETED"}
    assert f"/#/experiments/{pretrain_run.info.experiment_id}/runs/{parent}" in artifact


def _pipeline(root: Path, env: dict[str, str]) -> str:
    stdout = run([str(BIN / "dinoflow"), "pipeline"], root, env)
    return stdout[stdout.index("{"):]
