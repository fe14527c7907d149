"""The repository's Prefect deployments, run the way a user runs them (docs/deployment.md).

A real ``prefect server start`` on 127.0.0.1; then, as subprocesses of the project's own ``prefect``
CLI in this checkout: ``prefect work-pool create`` (both pools of prefect.yaml, type process),
``prefect deploy --all`` (the repository's prefect.yaml, unchanged), ``prefect worker start --pool
cpu-pool`` (started outside the checkout: prefect.yaml's pull step must change into
``$DINOFLOW_CHECKOUT``) and ``prefect deployment run 'scheduled-evaluation/scheduled-evaluation'`` with
``--param`` overrides for a tiny evaluate params file and this test's model. The worker's environment
alone points the run at a temporary SQLite MLflow store and state folder, as in server mode.

Before the run the registry holds two versions (tests/test_evaluate_promotion.py): v1, a dead backbone
(every feature 0, chance accuracy) behind ``champion``, and v2, an untrained pico ViT behind
``challenger``. The flow run must end COMPLETED, with ``champion`` moved to v2, its MLflow runs linked
to the flow run and the ``promotion`` artifact on the server. The server and worker (process groups)
are stopped whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest
import yaml
from mlflow import MlflowClient

from components.environment import quiet_offline_defaults
from tests.test_evaluate_promotion import project, register_folder, save_tiny
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

REPO = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 180  # `prefect deploy` imports both flows (torch, mlflow): 10-30 s on 2 busy cores
RUN_TIMEOUT_S = 300  # worker poll + a fresh `python -m prefect.engine` process + two tiny evaluations
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
DEPLOYMENT = "scheduled-evaluation/scheduled-evaluation"
OVERRIDES = ["promotion.queries_per_class=10"]  # a list parameter through the CLI, as `--set` on the command line

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def tiny_params(folder: Path, name: str) -> Path:
    """An evaluate params file for a round of a few seconds: small subsets, no baselines nor optional
    suites (the run passes ``promotion.queries_per_class=10`` as an override: 100 validation queries)."""
    path = folder / "evaluate-tiny.yaml"
    path.write_text(yaml.safe_dump({"evaluate": {
        "dataset": {"train_per_class": 20, "test_per_class": 10},
        "ks": [5, 20], "cache_dir": str(folder / "features"),
        "linear": {"epochs": 2, "learning_rates": [0.1], "min_steps": 0},
        "logreg": {"c_grid": [1.0], "max_iter": 20, "tol": 1.0e-4},
        "baselines": {"random_init": False, "random_no_layerscale": False, "pixels": False},
        "retrieval": {"enabled": False}, "copydetect": {"enabled": False},
        "dense": {"enabled": False}, "pca_picture": {"enabled": False},
        "champion": f"models:/{name}@champion",
        "schedule": {"model_name": name},
    }}))
    return path


@contextlib.contextmanager
def prefect_server(folder: Path) -> Iterator[tuple[Server, str]]:
    """``prefect server start`` on 127.0.0.1 with its own SQLite database (not yet waited for: the
    caller polls its health after doing other work meanwhile). Its process group is stopped on exit."""
    folder.mkdir()
    port = free_port()
    env = {**clean_environ(), "PREFECT_HOME": str(folder),
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{folder / 'prefect.db'}",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    # No services: the nightly schedule then creates no runs of its own while the test runs.
    server = start_server("prefect server", [
        str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
        "--no-ui", "--no-services", "--analytics-off"], env, folder / "server.log")
    try:
        yield server, f"http://127.0.0.1:{port}/api"
    finally:
        stop_server(server)


@contextlib.contextmanager
def worker(folder: Path, env: Mapping[str, str]) -> Iterator[Server]:
    """``prefect worker start --pool cpu-pool`` in ``folder`` (not the checkout); stopped on exit."""
    folder.mkdir()
    started = start_server("prefect worker", [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool"],
                           env, folder / "worker.log")
    try:
        yield started
    finally:
        stop_server(started)


def prefect(env: Mapping[str, str], *args: str) -> str:
    """One ``prefect`` CLI command in the checkout, as a user types it; its output."""
    try:
        done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=dict(env), capture_output=True,
                              text=True, timeout=CLI_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"prefect {' '.join(args)} still running after {CLI_TIMEOUT_S} s:\n{exc.stdout!r}\n{exc.stderr!r}")
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"prefect {' '.join(args)} failed ({done.returncode}):\n{output[-6000:]}"
    return output


def registered_deployments(api_url: str) -> dict[str, dict[str, object]]:
    """The server's deployments by ``flow/deployment`` name (REST API)."""
    flows = httpx.post(f"{api_url}/flows/filter", json={}, timeout=10.0).raise_for_status().json()
    names = {flow["id"]: flow["name"] for flow in flows}
    found = httpx.post(f"{api_url}/deployments/filter", json={}, timeout=10.0).raise_for_status().json()
    return {f"{names[d['flow_id']]}/{d['name']}": d for d in found}


def wait_final(api_url: str, run_id: str, watched: Server, deadline: float) -> dict[str, object]:
    """Poll the flow run until it is in a final state; fail with the worker's log if it never gets there."""
    while time.monotonic() < deadline:
        run: dict[str, object] = httpx.get(f"{api_url}/flow_runs/{run_id}", timeout=10.0).raise_for_status().json()
        if run["state_type"] in FINAL_STATES:
            return run
        if watched.process.poll() is not None:
            pytest.fail(f"worker exited with {watched.process.returncode}:\n{watched.tail(8000)}")
        time.sleep(1.0)
    pytest.fail(f"flow run {run_id} not finished after {RUN_TIMEOUT_S} s (state {run['state_type']}):\n"
                f"{watched.tail(8000)}")


@pytest.mark.slow
def test_deployed_scheduled_evaluation_runs_on_a_process_worker_and_promotes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    state = tmp_path / "state"
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    name = f"test-deploy-{uuid.uuid4().hex[:8]}"
    params = tiny_params(tmp_path, name)

    with prefect_server(tmp_path / "prefect-server") as (server, api_url):
        # While the server migrates its database: the registry, through the same store the worker uses.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        monkeypatch.setenv("DINOFLOW_HOME", str(state))  # the experiment's artifact root goes there
        previous_uri = mlflow.get_tracking_uri()
        try:
            (tmp_path / "registering").mkdir()
            project(tmp_path / "registering")
            champion = register_folder(name, save_tiny(tmp_path / "v1", seed=1, dead=True))
            MlflowClient().set_registered_model_alias(name, "champion", champion)
            challenger = register_folder(name, save_tiny(tmp_path / "v2", seed=2))  # alias challenger
        finally:
            mlflow.set_tracking_uri(previous_uri)
            mlflow.set_registry_uri(previous_uri)
        registry = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        assert (champion, challenger) == ("1", "2")

        wait_healthy(server, f"{api_url}/health", time.monotonic() + START_TIMEOUT_S)
        # What the worker's machine exports (docs/deployment.md): the servers, the state folder, the checkout.
        env = {**clean_environ(), **quiet_offline_defaults(state), "PREFECT_API_URL": api_url,
               "MLFLOW_TRACKING_URI": tracking_uri, "DINOFLOW_CHECKOUT": str(REPO),
               "PREFECT_WORKER_QUERY_SECONDS": "2"}  # poll every 2 s instead of 10
        for pool in ("cpu-pool", "gpu-pool"):  # every pool prefect.yaml names must exist for `deploy --all`
            prefect(env, "work-pool", "create", pool, "--type", "process")
        prefect(env, "deploy", "--all", "--no-prompt")
        deployed = registered_deployments(api_url)
        assert set(deployed) == {"pipeline/pipeline", DEPLOYMENT}, deployed
        assert deployed[DEPLOYMENT]["work_pool_name"] == "cpu-pool"
        assert deployed["pipeline/pipeline"]["work_pool_name"] == "gpu-pool"
        assert [s["schedule"]["cron"] for s in deployed[DEPLOYMENT]["schedules"]] == ["0 2 * * *"]

        # The worker runs in its own folder: the run finds flows/scheduled_evaluation.py only if the pull
        # step changed into $DINOFLOW_CHECKOUT.
        with worker(tmp_path / "worker", env) as running:
            created = prefect(env, "deployment", "run", DEPLOYMENT, "--param", f"model_name={name}",
                              "--param", f"params={params}", "--param", f"overrides={json.dumps(OVERRIDES)}")
            found = re.search(r"UUID:\s*([0-9a-f-]{36})", created)
            assert found, created
            run_id = found.group(1)
            run = wait_final(api_url, run_id, running, time.monotonic() + RUN_TIMEOUT_S)
            assert run["state_type"] == "COMPLETED", f"{run['state']}\n{running.tail(8000)}"
            worker_log = running.tail(20000)

        assert run["parameters"] == {"model_name": name, "params": str(params),
                                     "project_params": "params/project.yaml", "overrides": OVERRIDES}
        artifacts = httpx.post(f"{api_url}/artifacts/filter", timeout=10.0, json={
            "artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": ["promotion"]}}}).raise_for_status()
        markdown = "\n".join(str(artifact["data"]) for artifact in artifacts.json())

    assert aliases_at(registry, name) == {"champion": challenger, "challenger": challenger}, worker_log[-6000:]
    assert f"`{name}`" in markdown and "decision: **promoted**" in markdown, markdown
    assert "(paired bootstrap, 100 queries" in markdown, markdown  # the override reached the worker's run
    # Both evaluations ran in the deployed flow run (not in this process): their MLflow runs link it.
    experiment = registry.get_experiment_by_name("dinoflow")
    assert experiment is not None
    evaluations = [r for r in registry.search_runs([experiment.experiment_id])
                   if r.data.tags.get("prefect.flow_run_id") == run_id]
    assert len(evaluations) == 2, [r.data.tags for r in registry.search_runs([experiment.experiment_id])]
    assert (state / "scheduled-eval" / "challenger.json").is_file()  # the state folder the worker was given


def aliases_at(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(version) for alias, version in client.get_registered_model(name).aliases.items()}
