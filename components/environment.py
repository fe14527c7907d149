"""Where dinoflow keeps its state, and the environment that keeps the tools quiet and offline.

Prefect, MLflow and DVC each phone home or write outside the project unless told not to. The
variables below were each seen to matter on a fresh machine (see docs/configuration.md). They are
applied with ``setdefault`` semantics: a value the user exported always wins, so pointing dinoflow
at a real Prefect or MLflow server is a matter of environment variables only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from pathlib import Path

STATE_DIR_ENV = "DINOFLOW_HOME"
DEFAULT_STATE_DIR_NAME = ".dinoflow"


def project_root(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` holding a ``pyproject.toml`` or ``dvc.yaml``.

    Falls back to ``start`` itself so dinoflow also works from a folder that is not a checkout.
    """
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() or (folder / "pyproject.toml").is_file():
            return folder
    return here


def state_dir(environ: Mapping[str, str] | None = None, start: Path | None = None) -> Path:
    """The project state folder: ``$DINOFLOW_HOME`` if set, else ``<project root>/.dinoflow``."""
    env = os.environ if environ is None else environ
    configured = env.get(STATE_DIR_ENV)
    if configured:
        return Path(configured).expanduser().resolve()
    return project_root(start) / DEFAULT_STATE_DIR_NAME


def quiet_offline_defaults(state: Path) -> dict[str, str]:
    """Environment defaults that keep Prefect, MLflow and DVC inside ``state`` and off the network."""
    return {
        STATE_DIR_ENV: str(state),
        # Prefect: project-local home (API database, profiles), no telemetry; the ephemeral API
        # server takes 14-16 s to start cold here, past Prefect's default 20 s limit on slow disks.
        "PREFECT_HOME": str(state / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY": "false",
        # MLflow: no telemetry (a DNS lookup on import otherwise); `mlflow server` without the
        # job-execution workers (about 2 GB of extra processes otherwise).
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # DVC: no analytics report per command, and its site cache inside the project.
        "DVC_NO_ANALYTICS": "1",
        "DVC_SITE_CACHE_DIR": str(state / "dvc-site"),
        # Hugging Face / timm: never reach a hub at run time unless the user asks for it.
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
    }


def apply_environment(
    environ: MutableMapping[str, str] | None = None, start: Path | None = None
) -> Path:
    """Set the quiet/offline defaults in ``environ`` (default: ``os.environ``) and create the state dir.

    Returns the state folder. Existing variables are never overwritten.
    """
    env = os.environ if environ is None else environ
    state = state_dir(env, start)
    for key, value in quiet_offline_defaults(state).items():
        env.setdefault(key, value)
    state.mkdir(parents=True, exist_ok=True)
    return state


def ui_environment(
    environ: Mapping[str, str] | None = None, root: Path | None = None, project_params: str | Path | None = None
) -> dict[str, str]:
    """What a tool started by hand (``mlflow ui``, ``prefect server start``) needs to see dinoflow's stores.

    The quiet/offline defaults as :func:`apply_environment` resolves them (user values win), plus
    ``MLFLOW_UI_URI`` (the tracking store the CLI writes to: ``MLFLOW_TRACKING_URI``, else
    ``tracking.uri`` of ``params/project.yaml``, else the project's SQLite database) and
    ``MLFLOW_UI_ARTIFACTS`` (the project's artifact root). ``environ`` is not modified.
    """
    from components.config.project import load_project_config

    env = dict(os.environ if environ is None else environ)
    top = project_root(root)
    state = apply_environment(env, top)
    params = Path(project_params) if project_params is not None else Path("params/project.yaml")
    project = load_project_config(params if params.is_absolute() else top / params)
    values = {key: env[key] for key in quiet_offline_defaults(state)}
    values["MLFLOW_UI_URI"] = project.tracking_uri(state, env)
    values["MLFLOW_UI_ARTIFACTS"] = project.artifact_root(state)
    return values


def shell_exports(values: Mapping[str, str]) -> str:
    """``values`` as POSIX ``export KEY='value'`` lines, for ``eval`` in any sh (infra/state-env.sh)."""
    import shlex

    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in values.items())


def main(argv: list[str] | None = None) -> int:
    """``python -m components.environment --shell``: print the project's environment as shell exports."""
    import argparse
    import json

    parser = argparse.ArgumentParser(
        prog="python -m components.environment",
        description="Print the environment dinoflow sets for itself (state folder, quiet/offline defaults, "
                    "the MLflow store of the UI), for tools started by hand. Used by infra/state-env.sh.")
    parser.add_argument("--shell", action="store_true", help="POSIX sh export lines (default: JSON)")
    parser.add_argument("--root", type=Path, default=None,
                        help="project root, or a folder inside it (default: the current folder)")
    parser.add_argument("--project", default=None,
                        help="project parameter file, relative to the root (default: params/project.yaml)")
    args = parser.parse_args(argv)
    values = ui_environment(root=args.root, project_params=args.project)
    print(shell_exports(values) if args.shell else json.dumps(values, indent=2), end="" if args.shell else "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
