"""Log (and optionally register) a backbone folder as an MLflow pyfunc model that serves embeddings.

The model is logged from code (components/serving/pyfunc_model.py) with the backbone folder as its
``backbone`` artifact: no pickle anywhere. Call it inside an active MLflow run (the stage's run).
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from components.models.export import CONFIG_FILE, WEIGHTS_FILE
from components.serving.embed import EmbedOptions

CODE_FILE = Path(__file__).with_name("pyfunc_model.py")
SERVING_PACKAGES = ("torch", "safetensors", "numpy", "pandas", "pillow", "mlflow")
FORMAT_TAG = "dinoflow.format"


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
        version_tags = {"dinoflow.kind": "backbone", FORMAT_TAG: "pyfunc", **(tags or {})}
        mlflow.register_model(info.model_uri, registered_model_name, tags=version_tags)
    return str(info.model_uri)
