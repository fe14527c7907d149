"""Any model source -> a loaded backbone: ``components.registry.load(uri) -> BackboneBundle``.

Registry versions are resolved through the *project's* MLflow registry wherever the process runs:
``MLFLOW_TRACKING_URI`` if set, else ``tracking.uri`` of ``params/project.yaml`` at the project root
(found from the working folder), else the embedded store in the state folder, the same precedence the
stages use. So a plain Python session in the project folder loads ``models:/dinoflow-backbone@champion``
without any set-up. Every other kind of source is built by ``components.models.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from components.models.export import BackboneBundle, load_backbone
from components.models.hub import load as load_local
from components.registry.resolve import ResolvedModel, resolve
from components.registry.uri import ModelSource, parse_source

PROJECT_PARAMS = "params/project.yaml"


def project_tracking_uri(root: Path | None = None, project_params: str | Path = PROJECT_PARAMS) -> str:
    """The MLflow tracking (and registry) URI of the project at or above ``root`` (default: working folder)."""
    from components.config.project import ProjectConfig, load_project_config
    from components.environment import apply_environment, project_root

    top = project_root(root)
    state = apply_environment(start=top)  # quiet, offline MLflow before it is imported
    params = Path(project_params)
    params = params if params.is_absolute() else top / params
    project = load_project_config(params) if params.is_file() else ProjectConfig()
    return project.tracking_uri(state)


def project_client(root: Path | None = None, project_params: str | Path = PROJECT_PARAMS) -> Any:
    """An ``MlflowClient`` on the project's registry (see the module docstring); no global MLflow state changes."""
    from mlflow import MlflowClient

    uri = project_tracking_uri(root, project_params)
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def load(uri: str | Path | ModelSource, device: str | torch.device = "cpu", cache_dir: Path | None = None,
         client: Any | None = None, root: Path | None = None, seed: int = 0) -> BackboneBundle:
    """The backbone ``uri`` names, in eval mode on ``device``.

    ``client``: the registry to use (default: the project's); ``cache_dir``: where versions are downloaded
    (default ``<state>/cache/models``); ``root``: the project root relative paths start from."""
    source = uri if isinstance(uri, ModelSource) else parse_source(str(uri))
    if source.kind != "registry":
        return load_local(source, device=device, root=root, seed=seed)
    from components.environment import project_root, state_dir

    top = project_root(root)
    client = client if client is not None else project_client(top)
    resolved = resolve(source, top, cache_dir or state_dir(start=top) / "cache" / "models", client)
    bundle = load_resolved(resolved, device=device, root=top)
    bundle.metadata.setdefault("registry", {"name": resolved.name, "version": resolved.version,
                                            "run_id": resolved.run_id, "source": resolved.artifact_source})
    return bundle


def load_resolved(model: ResolvedModel, device: str | torch.device = "cpu", root: Path | None = None,
                  seed: int = 0) -> BackboneBundle:
    """The backbone of an already resolved source: its backbone folder when it has one, else built
    from the source itself (``hub:``, ``state_dict:``, ``random:``)."""
    if model.backbone_dir is not None:
        return load_backbone(model.backbone_dir, device=device)
    if model.layout == "checkpoint":
        raise ValueError(f"{model.uri}: a training checkpoint, not a backbone; export it (the pretrain stage "
                         "writes <output_dir>/backbone) or name the backbone folder")
    return load_local(model.source, device=device, root=root, seed=seed)
