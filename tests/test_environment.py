from __future__ import annotations

from pathlib import Path

from components.environment import (
    apply_environment,
    project_root,
    quiet_offline_defaults,
    shell_exports,
    state_dir,
    ui_environment,
)


def test_defaults_point_inside_the_state_folder(tmp_path: Path) -> None:
    env: dict[str, str] = {"DINOFLOW_HOME": str(tmp_path / "state")}
    state = apply_environment(env)
    assert state == (tmp_path / "state").resolve() and state.is_dir()
    assert env["PREFECT_HOME"] == str(state / "prefect")
    assert env["DVC_SITE_CACHE_DIR"] == str(state / "dvc-site")
    for key in ("PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "DVC_NO_ANALYTICS"):
        assert key in env
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_user_values_are_never_overwritten(tmp_path: Path) -> None:
    env = {"DINOFLOW_HOME": str(tmp_path), "PREFECT_HOME": "/custom/prefect", "MLFLOW_DISABLE_TELEMETRY": "false"}
    apply_environment(env)
    assert env["PREFECT_HOME"] == "/custom/prefect"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "false"


def test_state_dir_defaults_to_project_root(tmp_path: Path) -> None:
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    assert project_root(nested) == tmp_path.resolve()
    assert state_dir({}, nested) == tmp_path.resolve() / ".dinoflow"
    assert set(quiet_offline_defaults(tmp_path)) >= {"PREFECT_HOME", "DVC_SITE_CACHE_DIR"}


def test_ui_environment_resolves_the_tracking_store_like_the_cli(tmp_path: Path) -> None:
    """`make mlflow-ui` serves what `dinoflow` writes to: environment, then params/project.yaml, then SQLite."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "params").mkdir()
    env = {"DINOFLOW_HOME": str(tmp_path / "state")}
    state = (tmp_path / "state").resolve()
    default = ui_environment(env, tmp_path)
    assert default["MLFLOW_UI_URI"] == f"sqlite:///{state}/mlflow/mlflow.db"
    assert default["MLFLOW_UI_ARTIFACTS"] == (state / "mlflow" / "artifacts").as_uri()
    assert default["PREFECT_HOME"] == str(state / "prefect") and env == {"DINOFLOW_HOME": str(tmp_path / "state")}
    (tmp_path / "params" / "project.yaml").write_text("tracking:\n  uri: sqlite:////srv/runs.db\n")
    assert ui_environment(env, tmp_path)["MLFLOW_UI_URI"] == "sqlite:////srv/runs.db"
    served = ui_environment({**env, "MLFLOW_TRACKING_URI": "http://127.0.0.1:6000", "PREFECT_HOME": "/p"}, tmp_path)
    assert served["MLFLOW_UI_URI"] == "http://127.0.0.1:6000" and served["PREFECT_HOME"] == "/p"
    assert shell_exports({"A": "it's", "B": "x y"}) == "export A='it'\"'\"'s'\nexport B='x y'\n"
