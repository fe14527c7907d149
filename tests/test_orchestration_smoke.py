"""Prefect and MLflow on the embedded defaults: no server to start, no network.

The offline test runs in a fresh network namespace holding only a loopback interface, so any
attempt to reach the outside world fails rather than silently succeeding.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SMOKE = textwrap.dedent(
    """
    import json, os, sys
    import flows  # applies the quiet environment before Prefect is imported
    from prefect import flow, task

    @task
    def double(x: int) -> int:
        return 2 * x

    @flow(name="smoke")
    def smoke(x: int) -> int:
        return double(x) + 1

    assert smoke(20) == 41

    from components.config.project import ProjectConfig
    from components.environment import apply_environment
    from components.tracking import stage_run, tracking_target
    import mlflow
    from mlflow import MlflowClient

    state = apply_environment()
    target = tracking_target(ProjectConfig(), state)
    with stage_run(target, "smoke", {"lr": 0.1}) as run:
        mlflow.log_metric("loss", 1.5, step=0)
        mlflow.log_text("hello", "notes/hello.txt")
    client = MlflowClient()
    got = client.get_run(run.info.run_id)
    assert got.data.params["smoke.lr"] == "0.1", got.data.params
    assert got.data.metrics["loss"] == 1.5
    client.create_registered_model("smoke-model")
    version = client.create_model_version("smoke-model", f"runs:/{run.info.run_id}/notes", run_id=run.info.run_id)
    client.set_registered_model_alias("smoke-model", "champion", version.version)
    assert client.get_model_version_by_alias("smoke-model", "champion").version == version.version
    print(json.dumps({"tracking": mlflow.get_tracking_uri(), "artifact": got.info.artifact_uri,
                      "prefect_home": os.environ["PREFECT_HOME"]}))
    """
)


def _offline_command(script: str) -> list[str] | None:
    """Run ``script`` in a new network namespace with only loopback up, when the kernel lets us."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return None
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return None
    return ["unshare", "--net", "sh", "-c", f'ip link set lo up && exec "{sys.executable}" -c "$0"', script]


@pytest.mark.slow
def test_prefect_flow_and_mlflow_registry_run_offline_on_embedded_defaults(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["DINOFLOW_HOME"] = str(tmp_path / "state")
    command = _offline_command(SMOKE)
    offline = command is not None
    if command is None:
        command = [sys.executable, "-c", SMOKE]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, f"offline={offline}\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    state = tmp_path / "state"
    assert (state / "mlflow" / "mlflow.db").is_file()
    assert (state / "mlflow" / "artifacts").is_dir()
    assert (state / "prefect").is_dir(), "Prefect must keep its database inside the state folder"
    assert any((state / "prefect").rglob("*.db")), "embedded Prefect API database in the state folder"
    assert f"sqlite:///{state}" in done.stdout
    assert "Logging error" not in done.stderr, done.stderr[-6000:]
    if not offline:
        pytest.skip("ran, but could not isolate the network (no unshare): offline-ness not proven")


IN_PROCESS_FLOW_TEST = textwrap.dedent(
    """
    def test_tiny_flow_in_process():
        import flows  # the project's environment; Prefect's temporary server, as the CLI uses it
        from prefect import flow

        @flow(name="tiny")
        def tiny() -> int:
            return 1

        assert tiny() == 1
    """
)


@pytest.mark.slow
def test_flow_runs_on_the_temporary_server_end_without_logging_errors(tmp_path: Path) -> None:
    """Prefect logs while it stops its temporary server at exit; that must not hit a closed stream.

    The stream was pytest's capture (closed before Prefect's atexit hooks ran), so the flow runs in process
    in a pytest session of its own, in a subprocess, with this suite's conftest. The plain-process case (what
    the CLI does) is asserted by the smoke test above."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "DINOFLOW_"))}
    (tmp_path / "test_tiny_flow.py").write_text(IN_PROCESS_FLOW_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's settings (testpaths, markers)
    session = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest", "-c",
         str(tmp_path / "pytest.ini"), str(tmp_path / "test_tiny_flow.py")],
        cwd=REPO, env={**env, "DINOFLOW_TEST_STATE": str(tmp_path / "state")}, capture_output=True, text=True,
        timeout=300, check=False)
    output = session.stdout + session.stderr
    assert session.returncode == 0, output[-6000:]
    assert "1 passed" in output and "Stopping temporary server" in output, output[-6000:]
    assert "Logging error" not in output and "I/O operation on closed file" not in output, output[-6000:]
