"""The only code that writes the MLflow model registry: register a backbone, tag versions, log the pyfunc model.

A backbone is registered as an MLflow pyfunc model logged from code (components/serving/pyfunc_model.py)
with the backbone folder as its ``backbone`` artifact: servable with ``mlflow models serve``, no pickle
anywhere. Alias moves of champion / challenger are ``promotion.py``'s; ``register_backbone`` points
``challenger`` at every new version. Call these inside the stage's active MLflow run, after the
stage has pointed MLflow at the project (``components.tracking.stage_run``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from components.models.export import CONFIG_FILE, WEIGHTS_FILE

CODE_FILE = Path(__file__).parents[1] / "serving" / "pyfunc_model.py"
SERVING_PACKAGES = ("torch", "safetensors", "numpy", "pandas", "pillow", "mlflow")
KIND_TAG = "dinoflow.kind"
FORMAT_TAG = "dinoflow.format"
EVAL_TAG_PREFIX = "eval."
CHALLENGER_ALIAS = "challenger"


def serving_requirements() -> list[str]:
    """Pinned versions of what the pyfunc model imports. dinoflow itself is not on PyPI: serve with
    ``--env-manager local`` from an environment where it is installed (or build an image with it)."""
    pins = []
    for package in SERVING_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def log_backbone_pyfunc(
    backbone_dir: Path,
    artifact_path: str = "model",
    registered_model_name: str | None = None,
    model_config: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log ``backbone_dir`` as a pyfunc model in the active run; returns its model URI.

    With ``registered_model_name`` a new registry version is created too, tagged
    ``dinoflow.kind=backbone`` and ``dinoflow.format=pyfunc`` (plus ``tags``).
    """
    import mlflow

    from components.serving.embed import EmbedOptions

    backbone_dir = Path(backbone_dir)
    if not (backbone_dir / CONFIG_FILE).is_file() or not (backbone_dir / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{backbone_dir}: not a backbone folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    options = EmbedOptions.from_mapping(model_config)  # fail here, not in the server
    info = mlflow.pyfunc.log_model(
        name=artifact_path,
        python_model=str(CODE_FILE),
        artifacts={"backbone": str(backbone_dir)},
        model_config={k: v for k, v in vars(options).items()},
        pip_requirements=serving_requirements(),
    )
    if registered_model_name is not None:
        version_tags = {KIND_TAG: "backbone", FORMAT_TAG: "pyfunc", **(tags or {})}
        mlflow.register_model(info.model_uri, registered_model_name, tags=version_tags)
    return str(info.model_uri)


def register_backbone(name: str, run_id: str, backbone_dir: Path | None = None,
                      tags: Mapping[str, str] | None = None) -> str:
    """Register the run's backbone as a new version of ``name``, tag it, point ``challenger`` at it.

    With ``backbone_dir`` (inside the active run) the version is the pyfunc model above. Without it,
    the run's plain ``backbone`` artifact folder is registered (older versions, tests)."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    if backbone_dir is not None:
        model_uri = log_backbone_pyfunc(backbone_dir, artifact_path="model")
        version = mlflow.register_model(model_uri, name, tags={KIND_TAG: "backbone", FORMAT_TAG: "pyfunc"})
    else:
        with contextlib.suppress(MlflowException):  # already registered
            client.create_registered_model(name)
        source = f"{client.get_run(run_id).info.artifact_uri}/backbone"
        version = client.create_model_version(name, source, run_id=run_id, tags={KIND_TAG: "backbone"})
    number = str(version.version)
    tag_version(name, number, tags or {}, client)
    client.set_registered_model_alias(name, CHALLENGER_ALIAS, number)
    return number


def tag_version(name: str, version: str, tags: Mapping[str, str], client: Any | None = None) -> None:
    """Set ``tags`` on one registry version."""
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)


def tag_evaluation(name: str, version: str, metrics: Mapping[str, float], run_id: str,
                   client: Any | None = None) -> None:
    """A version's own evaluation numbers as ``eval.<metric>`` tags (baselines, dotted keys, are left out),
    plus ``eval.run_id``: reports read the champion's numbers back from them (promotion.py)."""
    tags = {f"{EVAL_TAG_PREFIX}run_id": run_id}
    tags.update({f"{EVAL_TAG_PREFIX}{key}": f"{value:.6f}" for key, value in metrics.items() if "." not in key})
    tag_version(name, version, tags, client)
