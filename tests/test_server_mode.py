"""Server mode, tested for real: the stage commands against an MLflow server, a Prefect server and S3.

Three real servers on 127.0.0.1: Ceph RGW (S3, from tests/conftest.py), ``mlflow server`` with its
artifact destination in an S3 bucket, and ``prefect server start``. The stages run as ``dinoflow``
subprocesses in a fresh project folder whose ``params/project.yaml`` is the shipped one (all
embedded defaults): only environment variables point them at the servers, as in production.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_TIMEOUT_S = 180  # both servers start in 10-40 s on 2 busy cores; Prefect migrates its database first
STAGE_TIMEOUT_S = 300

DATA_PARAMS = """\
demo:
  manifest: data/demo/pool.parquet
  metrics: metrics/data.json
  fashion_mnist: {train_per_class: 3, test_per_class: 1}
  photos: [coffee]
"""

PRETRAIN_PARAMS = """\
pretrain:
  data: {manifest: data/demo/pool.parquet, splits: [train], batch_size_per_rank: 4, num_workers: 0, seed: 0}
  crops: {global_crops_size: 28, local_crops_size: 12, local_crops_number: 2}
  backbone: {arch: vit_pico, patch_size: 4, img_size: 28, drop_path_rate: 0.0, layerscale_init: 0.1}
  objective:
    precision: fp32
    dino: {head: {n_prototypes: 64, hidden_dim: 32, bottleneck_dim: 16}}
    ibot: {head: {n_prototypes: 64, hidden_dim: 32, bottleneck_dim: 16}}
    teacher: {warmup_teacher_temp_iters: 1}
    optim: {iterations: 3, warmup_iters: 1, freeze_last_layer_iters: 1}
  run: {output_dir: outputs/pretrain, log_every: 1, device: cpu}
  checkpoint: {every: 2, keep_last: 1}
  publish: {registered_model_name: MODEL_NAME}
"""

EVALUATE_PARAMS = """\
evaluate:
  model: models:/MODEL_NAME@challenger
  dataset: {train_per_class: 5, test_per_class: 2, seed: 0}
  image_size: 28
  batch_size: 64
  ks: [5]
  linear: {enabled: true, epochs: 2, learning_rates: [0.1], min_steps: 0}
  logreg: {enabled: true, c_grid: [1.0], max_iter: 20, tol: 1.0e-3}
  baselines: {random_init: false, random_no_layerscale: false, pixels: true}
  champion: ""
  device: cpu
  metrics_path: metrics/eval.json
  plots_path: metrics/eval_knn_sweep.json
"""


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(name: str, command: list[str], env: Mapping[str, str], log: Path) -> Server:
    """Start ``command`` in its own process group (so stopping it also stops its workers)."""
    with log.open("wb") as out:
        process = subprocess.Popen(command, env=dict(env), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True, cwd=log.parent)
    return Server(name, process, log)


def stop_server(server: Server, grace_s: float = 15.0) -> None:
    """SIGTERM the whole process group, SIGKILL what is left after ``grace_s``."""
    if server.process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=grace_s)


def wait_healthy(server: Server, url: str, deadline: float) -> None:
    """Poll ``url`` until it answers 200; fail with the server's log if it dies or never answers."""
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            pytest.fail(f"{server.name} exited with {server.process.returncode}:\n{server.tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"{server.name} not healthy at {url} after {START_TIMEOUT_S} s:\n{server.tail()}")


def clean_environ() -> dict[str, str]:
    """The caller's environment without anything that would point a tool at another store or server."""
    prefixes = ("PREFECT_", "MLFLOW_", "DINOFLOW_", "AWS_")
    return {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}


@contextlib.contextmanager
def running_servers(tmp_path: Path, s3: Mapping[str, str], bucket: str) -> Iterator[tuple[str, str]]:
    """An MLflow server (SQLite backend, artifacts proxied to ``s3://bucket/mlflow``) and a Prefect server.

    Yields (MLFLOW_TRACKING_URI, PREFECT_API_URL); both process groups are stopped on exit, also on failure.
    """
    servers: list[Server] = []
    try:
        mlflow_port, prefect_port = free_port(), free_port()
        mlflow_dir, prefect_dir = tmp_path / "mlflow-server", tmp_path / "prefect-server"
        mlflow_dir.mkdir()
        prefect_dir.mkdir()
        mlflow_env = {**clean_environ(), **s3, "MLFLOW_S3_ENDPOINT_URL": s3["AWS_ENDPOINT_URL"],
                      "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        servers.append(start_server("mlflow server", [
            str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", f"s3://{bucket}/mlflow", "--host", "127.0.0.1",
            "--port", str(mlflow_port), "--workers", "1"], mlflow_env, mlflow_dir / "server.log"))
        prefect_env = {**clean_environ(), "PREFECT_HOME": str(prefect_dir),
                       "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_dir / 'prefect.db'}",
                       "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
        servers.append(start_server("prefect server", [
            str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port),
            "--no-ui", "--no-services", "--analytics-off"], prefect_env, prefect_dir / "server.log"))
        deadline = time.monotonic() + START_TIMEOUT_S
        tracking_uri, api_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        wait_healthy(servers[0], f"{tracking_uri}/health", deadline)
        wait_healthy(servers[1], f"{api_url}/health", deadline)
        yield tracking_uri, api_url
    finally:
        for server in servers:
            stop_server(server)


def write_project(root: Path, model_name: str) -> None:
    """A project folder with tiny stage params and the shipped (all-defaults) project params."""
    (root / "params").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")  # marks the project root for components.environment
    (root / "params" / "project.yaml").write_text((REPO / "params" / "project.yaml").read_text())
    (root / "params" / "data.yaml").write_text(DATA_PARAMS)
    (root / "params" / "pretrain.yaml").write_text(PRETRAIN_PARAMS.replace("MODEL_NAME", model_name))
    (root / "params" / "evaluate.yaml").write_text(EVALUATE_PARAMS.replace("MODEL_NAME", model_name))


def run_stage(stage: str, root: Path, env: Mapping[str, str]) -> dict[str, object]:
    try:
        done = subprocess.run([str(BIN / "dinoflow"), stage], cwd=root, env=dict(env), capture_output=True,
                              text=True, timeout=STAGE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else str(exc.stderr)
        pytest.fail(f"dinoflow {stage} still running after {STAGE_TIMEOUT_S} s:\n{err[-6000:]}")
    assert done.returncode == 0, f"dinoflow {stage} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    outputs: dict[str, object] = json.loads(done.stdout[done.stdout.index("{"):])
    return outputs


def prefect_flow_runs(api_url: str) -> list[dict[str, object]]:
    """Every flow run the Prefect server knows, with its flow's name (REST API, no client caching)."""
    flows = httpx.post(f"{api_url}/flows/filter", json={}, timeout=10.0).raise_for_status().json()
    names = {flow["id"]: flow["name"] for flow in flows}
    runs = httpx.post(f"{api_url}/flow_runs/filter", json={}, timeout=10.0).raise_for_status().json()
    return [{**run, "flow_name": names[run["flow_id"]]} for run in runs]


@pytest.mark.s3
@pytest.mark.slow
def test_stages_run_against_mlflow_prefect_and_s3_servers_from_environment_only(
    tmp_path: Path, s3_server: dict[str, str]
) -> None:
    import boto3

    s3 = dict(s3_server)
    suffix = uuid.uuid4().hex[:10]
    bucket, model_name = f"dinoflow-server-{suffix}", f"server-mode-backbone-{suffix}"
    client_s3 = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"], aws_access_key_id=s3["AWS_ACCESS_KEY_ID"],
                             aws_secret_access_key=s3["AWS_SECRET_ACCESS_KEY"], region_name=s3["AWS_DEFAULT_REGION"])
    client_s3.create_bucket(Bucket=bucket)  # MLflow's artifact destination must exist; the store creates its own
    project = tmp_path / "project"
    write_project(project, model_name)

    with running_servers(tmp_path, s3, bucket) as (tracking_uri, api_url):
        env = {**clean_environ(), **s3, "MLFLOW_TRACKING_URI": tracking_uri, "PREFECT_API_URL": api_url,
               "DINOFLOW_STORE_URI": f"s3://{bucket}/dinoflow"}
        data = run_stage("data", project, env)
        pretrain = run_stage("pretrain", project, env)
        evaluate = run_stage("evaluate", project, env)

        # The embedded defaults were not used: no SQLite MLflow store, no local object store.
        state = project / ".dinoflow"
        assert not (state / "mlflow" / "mlflow.db").exists()
        assert not (state / "store").exists()

        # MLflow, asked through the server: one run per stage with params, metrics and the Prefect link.
        from mlflow import MlflowClient

        mlflow = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        experiment = mlflow.get_experiment_by_name("dinoflow")
        assert experiment is not None
        runs = {run.data.tags["dinoflow.stage"]: run for run in mlflow.search_runs([experiment.experiment_id])}
        assert set(runs) == {"data", "pretrain", "evaluate"}
        assert runs["data"].data.metrics["images_total"] == 3 * 10 + 1 * 10 + 1
        counts = data["counts"]
        assert isinstance(counts, dict) and counts["total"] == 41
        assert runs["pretrain"].data.params["pretrain.backbone.arch"] == "vit_pico"
        assert "total_loss" in runs["pretrain"].data.metrics
        assert runs["pretrain"].info.run_id == pretrain["mlflow_run_id"]
        assert runs["evaluate"].info.run_id == evaluate["mlflow_run_id"]
        assert 0.0 <= runs["evaluate"].data.metrics["knn_top1_k5"] <= 1.0
        assert all(run.info.status == "FINISHED" for run in runs.values())
        # Artifacts go through the server's proxy, never straight from the client to S3.
        assert all(run.info.artifact_uri.startswith("mlflow-artifacts:") for run in runs.values())

        # The registry: the pretrained teacher is version 1 with alias challenger, and evaluate tagged it.
        version = mlflow.get_model_version_by_alias(model_name, "challenger")
        assert version.run_id == pretrain["mlflow_run_id"] and str(version.version) == pretrain["model_version"]
        assert evaluate["model_version"] == version.version
        assert float(version.tags["eval.knn_top1_k5"]) == pytest.approx(runs["evaluate"].data.metrics["knn_top1_k5"])

        # S3: the image pool under the store prefix and the run artifacts under the MLflow destination.
        keys = [obj["Key"] for page in client_s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for obj in page.get("Contents", [])]
        assert sum(key.startswith("dinoflow/pool/demo/") and key.endswith(".png") for key in keys) == 41
        run_prefix = f"mlflow/{experiment.experiment_id}/{pretrain['mlflow_run_id']}/artifacts/"
        assert {run_prefix + "backbone/model.safetensors", run_prefix + "backbone/config.json"} <= set(keys)

        # Prefect, asked through its REST API: the three flow runs are COMPLETED and are the ones MLflow links.
        flow_runs = prefect_flow_runs(api_url)
        assert sorted(str(run["flow_name"]) for run in flow_runs) == ["data", "evaluate", "pretrain"]
        assert all(run["state_type"] == "COMPLETED" for run in flow_runs), [r["state_type"] for r in flow_runs]
        by_flow = {run["flow_name"]: str(run["id"]) for run in flow_runs}
        for stage, run in runs.items():
            assert run.data.tags["prefect.flow_run_id"] == by_flow[stage]
