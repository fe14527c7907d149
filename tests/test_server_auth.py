"""Authentication, tested for real: MLflow's basic-auth app and Prefect's API auth string on 127.0.0.1.

The servers are started as the production stack (infra/compose/) starts them: ``mlflow server
--app-name basic-auth`` with its config written by ``infra/compose/mlflow_auth_config.py`` from a
secrets folder, and ``prefect server start`` with ``PREFECT_SERVER_API_AUTH_STRING``. The test checks
that both refuse requests without (or with wrong) credentials, that a ``dinoflow`` stage run as a
subprocess with the credentials only in its environment succeeds against both, and that no credential
(nor its base64 ``Authorization`` form) shows up in the stage's output, the servers' logs, the MLflow
runs' params and tags, the Prefect flow runs (parameters included) and their logs, or any file the
stage or the servers wrote outside the secrets folder.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from components.environment import quiet_offline_defaults
from tests.test_server_mode import (
    BIN,
    STAGE_TIMEOUT_S,
    START_TIMEOUT_S,
    Server,
    clean_environ,
    free_port,
    start_server,
    stop_server,
    wait_healthy,
)

REPO = Path(__file__).resolve().parents[1]
AUTH_CONFIG_SCRIPT = REPO / "infra" / "compose" / "mlflow_auth_config.py"
MLFLOW_USER = "dinoflow"

DATA_PARAMS = """\
demo:
  manifest: data/demo/pool.parquet
  metrics: metrics/data.json
  fashion_mnist: {train_per_class: 1, test_per_class: 1}
  photos: [coffee]
"""


@dataclass(frozen=True)
class Credentials:
    mlflow_password: str
    flask_secret_key: str
    prefect_auth_string: str

    def forbidden(self) -> dict[str, str]:
        """Every string that must never be written anywhere: the secrets and their Basic-auth headers."""
        def basic(value: str) -> str:
            return base64.b64encode(value.encode()).decode()

        return {
            "MLflow password": self.mlflow_password,
            "MLflow Authorization header": basic(f"{MLFLOW_USER}:{self.mlflow_password}"),
            "Flask secret key": self.flask_secret_key,
            "Prefect auth string": self.prefect_auth_string,
            "Prefect password": self.prefect_auth_string.split(":", 1)[1],
            "Prefect Authorization header": basic(self.prefect_auth_string),
        }


@dataclass(frozen=True)
class Endpoints:
    tracking_uri: str
    api_url: str
    servers: tuple[Server, ...]


@contextlib.contextmanager
def authenticated_servers(tmp_path: Path, creds: Credentials) -> Iterator[Endpoints]:
    """An MLflow server with the basic-auth app and a Prefect server with an auth string, both on 127.0.0.1.

    Both process groups are stopped on exit, also on failure.
    """
    servers: list[Server] = []
    try:
        secrets_dir, mlflow_dir, prefect_dir = (tmp_path / name for name in ("secrets", "mlflow-server",
                                                                              "prefect-server"))
        for folder in (secrets_dir, mlflow_dir, prefect_dir):
            folder.mkdir(mode=0o700)
        (secrets_dir / "mlflow_admin_password").write_text(creds.mlflow_password + "\n")
        auth_ini = secrets_dir / "conf" / "basic_auth.ini"
        quiet = {**clean_environ(), **quiet_offline_defaults(tmp_path / "server-state")}
        subprocess.run([sys.executable, str(AUTH_CONFIG_SCRIPT), str(auth_ini)], check=True, timeout=60,
                       capture_output=True, env={**quiet, "SECRETS_DIR": str(secrets_dir),
                                                 "MLFLOW_ADMIN_USERNAME": MLFLOW_USER,
                                                 "MLFLOW_AUTH_DATABASE_URI": f"sqlite:///{secrets_dir / 'auth.db'}"})
        mlflow_port, prefect_port = free_port(), free_port()
        mlflow_env = {**quiet, "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
                      "MLFLOW_FLASK_SERVER_SECRET_KEY": creds.flask_secret_key}
        servers.append(start_server("mlflow server", [
            str(BIN / "mlflow"), "server", "--app-name", "basic-auth",
            "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", str(mlflow_dir / "artifacts"), "--host", "127.0.0.1",
            "--port", str(mlflow_port), "--workers", "1"], mlflow_env, mlflow_dir / "server.log"))
        prefect_env = {**quiet, "PREFECT_HOME": str(prefect_dir),
                       "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_dir / 'prefect.db'}",
                       "PREFECT_SERVER_API_AUTH_STRING": creds.prefect_auth_string}
        servers.append(start_server("prefect server", [
            str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port),
            "--no-ui", "--no-services", "--analytics-off"], prefect_env, prefect_dir / "server.log"))
        deadline = time.monotonic() + START_TIMEOUT_S
        tracking_uri, api_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}/api"
        wait_healthy(servers[0], f"{tracking_uri}/health", deadline)  # health probes need no credentials
        wait_healthy(servers[1], f"{api_url}/health", deadline)
        yield Endpoints(tracking_uri, api_url, tuple(servers))
    finally:
        for server in servers:
            stop_server(server)


def assert_refused(response: httpx.Response, what: str) -> None:
    assert response.status_code in (401, 403), f"{what}: {response.status_code} {response.text[:300]}"


def assert_nothing_leaks(text: str, creds: Credentials, where: str) -> None:
    leaked = [name for name, value in creds.forbidden().items() if value in text]
    assert not leaked, f"{', '.join(leaked)} found in {where}"


def files_text(*folders: Path) -> Iterator[tuple[Path, str]]:
    """(path, contents) of every file under ``folders``, bytes decoded leniently (SQLite files included)."""
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                yield path, path.read_bytes().decode("latin-1")


@pytest.mark.slow
def test_servers_require_credentials_and_a_stage_authenticates_from_the_environment_without_leaking_them(
    tmp_path: Path,
) -> None:
    creds = Credentials(mlflow_password=secrets.token_urlsafe(24), flask_secret_key=secrets.token_urlsafe(24),
                        prefect_auth_string=f"dinoflow:{secrets.token_urlsafe(24)}")
    project = tmp_path / "project"
    (project / "params").mkdir(parents=True)
    (project / "pyproject.toml").write_text("")  # marks the project root for components.environment
    (project / "params" / "project.yaml").write_text((REPO / "params" / "project.yaml").read_text())
    (project / "params" / "data.yaml").write_text(DATA_PARAMS)
    mlflow_auth = (MLFLOW_USER, creds.mlflow_password)
    prefect_auth = tuple(creds.prefect_auth_string.split(":", 1))

    with authenticated_servers(tmp_path, creds) as servers, httpx.Client(timeout=10.0) as http:
        mlflow_api = f"{servers.tracking_uri}/api/2.0/mlflow"
        search = f"{mlflow_api}/experiments/search?max_results=1"
        # Refused without credentials and with wrong ones, on reads and on moving a registry alias.
        assert_refused(http.get(search), "MLflow without credentials")
        assert_refused(http.get(search, auth=(MLFLOW_USER, "not-the-password")), "MLflow with a wrong password")
        assert_refused(http.post(f"{mlflow_api}/registered-models/alias",
                                 json={"name": "dinoflow-backbone", "alias": "champion", "version": "1"}),
                       "MLflow alias change without credentials")
        assert_refused(http.post(f"{servers.api_url}/flow_runs/filter", json={}), "Prefect without credentials")
        assert_refused(http.post(f"{servers.api_url}/flow_runs/filter", json={}, auth=("dinoflow", "wrong")),
                       "Prefect with a wrong auth string")
        assert http.get(search, auth=mlflow_auth).status_code == 200
        assert http.post(f"{servers.api_url}/flow_runs/filter", json={}, auth=prefect_auth).json() == []

        # One real stage, in its Prefect flow, with the credentials only in its environment.
        env = {**clean_environ(), "MLFLOW_TRACKING_URI": servers.tracking_uri, "PREFECT_API_URL": servers.api_url,
               "MLFLOW_TRACKING_USERNAME": MLFLOW_USER, "MLFLOW_TRACKING_PASSWORD": creds.mlflow_password,
               "PREFECT_API_AUTH_STRING": creds.prefect_auth_string}
        try:
            done = subprocess.run([str(BIN / "dinoflow"), "data", "--engine", "prefect"], cwd=project, env=env,
                                  capture_output=True, text=True, timeout=STAGE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"dinoflow data still running after {STAGE_TIMEOUT_S} s:\n{str(exc.stderr)[-6000:]}")
        assert done.returncode == 0, f"dinoflow data failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        assert_nothing_leaks(done.stdout + done.stderr, creds, "the stage's stdout/stderr")
        outputs = json.loads(done.stdout[done.stdout.index("{"):])
        assert outputs["counts"]["total"] == 2 * 10 + 1

        # MLflow, asked through the authenticated API: the run is there, with no credential in it.
        experiment = http.get(f"{mlflow_api}/experiments/get-by-name", params={"experiment_name": "dinoflow"},
                              auth=mlflow_auth).raise_for_status().json()["experiment"]
        runs = http.post(f"{mlflow_api}/runs/search", json={"experiment_ids": [experiment["experiment_id"]]},
                         auth=mlflow_auth).raise_for_status().json()["runs"]
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
        data = runs[0]["data"]
        tags = {tag["key"]: tag["value"] for tag in data["tags"]}
        assert tags["dinoflow.stage"] == "data" and data["params"] and data["metrics"]
        assert tags["mlflow.user"] == MLFLOW_USER, "the run is attributed to the authenticated user"
        assert_nothing_leaks(json.dumps(runs) + json.dumps(experiment), creds, "the MLflow run's params/tags")

        # Prefect, asked through the authenticated API: the flow run completed, its parameters and logs are clean.
        flow_runs = http.post(f"{servers.api_url}/flow_runs/filter", json={},
                              auth=prefect_auth).raise_for_status().json()
        assert [run["state_type"] for run in flow_runs] == ["COMPLETED"]
        assert tags["prefect.flow_run_id"] == flow_runs[0]["id"]
        assert set(flow_runs[0]["parameters"]) >= {"params", "project_params"}
        logs = http.post(f"{servers.api_url}/logs/filter", json={}, auth=prefect_auth).raise_for_status().json()
        assert any("demo pool" in log["message"] for log in logs), "the flow run's logs reached the server"
        assert_nothing_leaks(json.dumps(flow_runs), creds, "the Prefect flow run (parameters included)")
        assert_nothing_leaks(json.dumps(logs), creds, "the Prefect flow run's logs")

    # After the servers stopped: their logs and databases, and everything the stage wrote. Only the
    # secrets folder (the auth config and the user store, which keeps a salted hash) holds a credential.
    for path, text in files_text(project, tmp_path / "mlflow-server", tmp_path / "prefect-server"):
        assert_nothing_leaks(text, creds, str(path.relative_to(tmp_path)))
    assert (tmp_path / "mlflow-server" / "server.log").stat().st_size > 0
