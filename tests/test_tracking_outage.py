"""The MLflow server goes away in the middle of training and comes back: training does not stop, the
metrics logged meanwhile reach the server once it is back, and the registration at the end succeeds.
Metrics are logged asynchronously (components/tracking/steps.py) and MLflow's HTTP client retries a
refused connection with exponential backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7: about four
minutes in all), which covers an outage of that length; a longer one fails the stage at its end.
A real ``mlflow server`` process (SQLite backend, proxied local artifacts) is killed and restarted on the
same port with the same store."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from components.stages.context import make_context
from components.stages.pretrain import run_pretrain
from components.train.checkpoint import latest_checkpoint
from tests.test_pretrain_engine import tiny_config, write_pool
from tests.test_server_mode import (
    BIN,
    START_TIMEOUT_S,
    Server,
    clean_environ,
    free_port,
    start_server,
    stop_server,
    wait_healthy,
)

ITERATIONS = 120
DOWN_AT_STEP = 20  # the checkpoint after which the server is killed
DOWN_FOR_S = 8.0


def mlflow_server(folder: Path, port: int) -> Server:
    env = {**clean_environ(), "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return start_server("mlflow server", [
        str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
        "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1"], env, folder / f"server-{time.monotonic_ns()}.log")


@pytest.mark.slow
def test_training_survives_an_mlflow_outage_and_delivers_its_metrics(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow import MlflowClient

    folder, port = tmp_path / "mlflow-server", free_port()
    folder.mkdir()
    uri = f"http://127.0.0.1:{port}"
    servers = [mlflow_server(folder, port)]
    try:
        wait_healthy(servers[0], f"{uri}/health", time.monotonic() + START_TIMEOUT_S)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        (tmp_path / "pyproject.toml").write_text("")
        cfg = tiny_config(write_pool(tmp_path, corrupt=False), tmp_path / "out", iterations=ITERATIONS)
        cfg.checkpoint.every = DOWN_AT_STEP
        cfg.publish.registered_model_name = "outage-backbone"
        outage: dict[str, float] = {}

        def take_the_server_down() -> None:  # while training runs: kill, wait, restart on the same port
            marker = tmp_path / "out" / "checkpoints" / f"step_{DOWN_AT_STEP:09d}"
            while not marker.exists():
                time.sleep(0.05)
            os.killpg(servers[-1].process.pid, signal.SIGKILL)  # a crash, not a shutdown
            servers[-1].process.wait(timeout=30)
            outage["down"] = time.monotonic()
            time.sleep(DOWN_FOR_S)
            newest = latest_checkpoint(tmp_path / "out" / "checkpoints")
            outage["step_before_restart"] = float(newest.name.removeprefix("step_")) if newest else 0.0
            servers.append(mlflow_server(folder, port))
            wait_healthy(servers[-1], f"{uri}/health", time.monotonic() + START_TIMEOUT_S)
            outage["up"] = time.monotonic()

        chaos = threading.Thread(target=take_the_server_down, daemon=True)
        chaos.start()
        outputs = run_pretrain(make_context(root=tmp_path), cfg)
        finished_at = time.monotonic()
        chaos.join(timeout=START_TIMEOUT_S)
        assert "up" in outage, "the server never came back"
        assert outage["down"] < finished_at, "training ended before the outage: make it longer"
        assert outage["step_before_restart"] > DOWN_AT_STEP  # training went on while the server was away
        assert outputs.result.finished and outputs.model_version is not None
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        history = client.get_metric_history(outputs.run_id, "total_loss")
        assert sorted(m.step for m in history) == list(range(ITERATIONS))  # nothing lost in the outage
        assert client.get_run(outputs.run_id).info.status == "FINISHED"
        assert str(client.get_model_version_by_alias("outage-backbone", "challenger").version) == \
            outputs.model_version
    finally:
        for server in servers:
            stop_server(server)
