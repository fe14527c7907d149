"""`make mlflow-ui` and `make prefect-ui` serve the stores the dinoflow CLI writes to.

A fresh state folder (DINOFLOW_HOME) is seeded the way the CLI does it: a Prefect flow run on the
embedded (temporary) Prefect server, an MLflow run and a registered model on the tracking store that
params/project.yaml resolves to. Then each Makefile target is started for real (GNU make, recipes in
/bin/sh, which is dash on Debian) on a free port and asked over its REST API for what was seeded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.test_server_mode import Server, clean_environ, free_port, start_server, stop_server, wait_healthy

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
START_TIMEOUT_S = 90  # each UI answers in 7-25 s on 2 busy cores

# What the CLI does, in one process: a flow run on Prefect's temporary server (PREFECT_HOME of the state
# folder), then an MLflow run with an artifact and a registered model on params/project.yaml's store.
SEED = textwrap.dedent(
    """
    import json
    from pathlib import Path
    import flows  # the quiet, project-local environment, as the CLI applies it
    from prefect import flow
    from prefect.runtime import flow_run

    @flow(name="ui-seed")
    def ui_seed() -> str:
        return str(flow_run.get_id())

    flow_run_id = ui_seed()

    import mlflow
    from mlflow import MlflowClient
    from components.config.project import load_project_config
    from components.environment import apply_environment
    from components.tracking import stage_run, tracking_target

    root = Path.cwd()
    target = tracking_target(load_project_config(root / "params" / "project.yaml"), apply_environment(start=root))
    with stage_run(target, "ui-seed", {"lr": 0.5}) as run:
        mlflow.log_metric("loss", 0.25)
        mlflow.log_text("hello", "notes/hello.txt")
    client = MlflowClient()
    client.create_registered_model("ui-seed-model")
    version = client.create_model_version("ui-seed-model", f"runs:/{run.info.run_id}/notes", run_id=run.info.run_id)
    client.set_registered_model_alias("ui-seed-model", "champion", version.version)
    print("SEED " + json.dumps({"flow_run_id": flow_run_id, "run_id": run.info.run_id,
                                "experiment": target.experiment, "tracking_uri": target.tracking_uri}))
    """
)


@dataclass(frozen=True)
class Seeded:
    env: dict[str, str]  # the environment the targets are started with (DINOFLOW_HOME = the seeded state)
    state: Path
    flow_run_id: str
    run_id: str
    experiment: str
    tracking_uri: str


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Seeded:
    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    state = tmp_path_factory.mktemp("ui-state") / "state"
    env = {**clean_environ(), "DINOFLOW_HOME": str(state)}
    done = subprocess.run([sys.executable, "-c", SEED], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240, check=False)
    assert done.returncode == 0, f"seeding failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    line = next(line for line in done.stdout.splitlines() if line.startswith("SEED "))
    got = json.loads(line[len("SEED "):])
    assert got["tracking_uri"] == f"sqlite:///{state.resolve()}/mlflow/mlflow.db", "the CLI's embedded store"
    return Seeded(env=env, state=state, flow_run_id=got["flow_run_id"], run_id=got["run_id"],
                  experiment=got["experiment"], tracking_uri=got["tracking_uri"])


StartTarget = Callable[[str, str, dict[str, str], str], int]


@pytest.fixture
def make_target(tmp_path: Path) -> Iterator[StartTarget]:
    """Start ``make -C <repo> <target> VAR=port`` in its own process group; killpg on exit, also on failure."""
    servers: list[Server] = []

    def start(target: str, port_var: str, env: dict[str, str], health: str) -> int:
        port = free_port()
        log = tmp_path / f"{target}.log"
        server = start_server(f"make {target}", ["make", "-C", str(REPO), target, f"{port_var}={port}",
                                                 f"VENV={VENV}"], env, log)
        servers.append(server)
        wait_healthy(server, f"http://127.0.0.1:{port}{health}", time.monotonic() + START_TIMEOUT_S)
        return port

    try:
        yield start
    finally:
        for server in servers:
            stop_server(server)


def test_state_env_is_posix_sh_and_names_the_clis_stores(tmp_path: Path) -> None:
    """infra/state-env.sh sourced by dash (the Makefile's shell) exports what components.environment resolves."""
    env = {**clean_environ(), "DINOFLOW_HOME": str(tmp_path / "state"), "DINOFLOW_ROOT": str(REPO),
           "DINOFLOW_PYTHON": sys.executable}
    shell = shutil.which("dash") or "/bin/sh"
    done = subprocess.run([shell, "-c", '. infra/state-env.sh && env'], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    exported = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    state = (tmp_path / "state").resolve()
    assert exported["PREFECT_HOME"] == str(state / "prefect")
    assert exported["MLFLOW_UI_URI"] == f"sqlite:///{state}/mlflow/mlflow.db"
    assert exported["MLFLOW_UI_ARTIFACTS"] == (state / "mlflow" / "artifacts").as_uri()

@pytest.mark.slow
def test_make_mlflow_ui_serves_the_clis_runs_and_registered_models(seeded: Seeded, make_target: StartTarget) -> None:
    fallbacks = ("mlflow.db", "mlartifacts", "mlruns")  # what `mlflow ui` creates in its folder without a store
    existing = {name for name in fallbacks if (REPO / name).exists()}
    port = make_target("mlflow-ui", "MLFLOW_PORT", seeded.env, "/health")
    api = f"http://127.0.0.1:{port}/api/2.0/mlflow"
    experiment = httpx.get(f"{api}/experiments/get-by-name", params={"experiment_name": seeded.experiment},
                           timeout=10).raise_for_status().json()["experiment"]
    runs = httpx.post(f"{api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]},
                      timeout=10).raise_for_status().json()["runs"]
    assert seeded.run_id in [run["info"]["run_id"] for run in runs]
    models = httpx.get(f"{api}/registered-models/search", params={"filter": "name='ui-seed-model'"},
                       timeout=10).raise_for_status().json()["registered_models"]
    assert [m["name"] for m in models] == ["ui-seed-model"]
    assert [a["alias"] for a in models[0].get("aliases", [])] == ["champion"]
    files = httpx.get(f"{api}/artifacts/list", params={"run_id": seeded.run_id, "path": "notes"},
                      timeout=10).raise_for_status().json()["files"]
    assert [f["path"] for f in files] == ["notes/hello.txt"], "the UI reads the project's artifact root"
    assert {name for name in fallbacks if (REPO / name).exists()} == existing, "no fallback store in the checkout"


@pytest.mark.slow
def test_make_prefect_ui_serves_the_flow_runs_of_the_embedded_server(seeded: Seeded, make_target: StartTarget) -> None:
    port = make_target("prefect-ui", "PREFECT_PORT", seeded.env, "/api/health")
    runs = httpx.post(f"http://127.0.0.1:{port}/api/flow_runs/filter", json={}, timeout=10).raise_for_status().json()
    assert seeded.flow_run_id in [run["id"] for run in runs], runs
    assert (seeded.state / "prefect" / "prefect.db").is_file(), "the database of PREFECT_HOME in the state folder"

