"""A model source -> its local files: one :class:`ResolvedModel` for every kind of source.

A registered version (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) is one of two layouts, and
both resolve to a backbone folder (``config.json`` + ``model.safetensors``):

- ``backbone``: the plain backbone folder (what ``pretrain`` registered first);
- ``pyfunc``: an MLflow pyfunc model logged from code (components/serving), whose ``artifacts/``
  hold the same backbone folder.

A version's files never change, so they are downloaded once: into a staging folder renamed into
place, which makes an existing target folder a complete one. The folder name carries a hash of the
version's source, so version 3 of the same name on another server is another folder.

A local path resolves against the project root and is classified by what it holds (backbone folder,
pyfunc model, training checkpoint, weights file). ``hub:``, ``random:``, ``state_dict:`` and
``pixels:`` sources have no registry files: they resolve to themselves (``directory`` is the
``state_dict:`` file when it is one, else None) and are built by ``loader.py``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from components.models.export import find_backbone_dir, is_backbone_dir
from components.registry.uri import ModelSource, parse_source
from components.train import checkpoint as ckpt

Layout = Literal["backbone", "pyfunc", "checkpoint", "weights", "none"]
MLMODEL_FILE = "MLmodel"
CHECKPOINT_ARTIFACT = "checkpoint"  # where the training stages log the final checkpoint in their run

__all__ = ["ResolvedModel", "download_once", "find_backbone_dir", "is_backbone_dir", "registry_version",
           "resolve", "resolve_model_uri", "safe_name", "version_checkpoint"]


@dataclass(frozen=True)
class ResolvedModel:
    source: ModelSource
    layout: Layout
    directory: Path | None  # the local files: a downloaded version, or the given path (absolute); else None
    backbone_dir: Path | None = None  # the backbone folder inside ``directory``, when it holds one
    name: str | None = None  # registry versions only: name, number, source run, artifact URI, aliases, tags
    version: str | None = None
    run_id: str | None = None
    artifact_source: str | None = None
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return self.source.text

    @property
    def from_registry(self) -> bool:
        return self.source.kind == "registry"

    def require_backbone_dir(self) -> Path:
        """The backbone folder, or a clear error for a source that has none (a checkpoint, hub:, random:...)."""
        if self.backbone_dir is None:
            raise FileNotFoundError(f"{self.uri}: holds no dinoflow backbone folder (layout {self.layout})")
        return self.backbone_dir


def resolve(source: str | ModelSource, root: Path, cache_dir: Path, client: Any | None = None) -> ResolvedModel:
    """``source`` -> :class:`ResolvedModel`; registry versions downloaded once into ``cache_dir``."""
    parsed = parse_source(source) if isinstance(source, str) else source
    if parsed.kind == "registry":
        return resolve_version(parsed, cache_dir, client)
    if parsed.kind == "path":
        path = Path(str(parsed.target))
        return resolve_path(parsed, path if path.is_absolute() else Path(root) / path)
    if parsed.kind == "state_dict" and parsed.target is not None and _exists(parsed.target, root):
        target = Path(parsed.target)
        return ResolvedModel(parsed, "weights", target if target.is_absolute() else Path(root) / target)
    return ResolvedModel(parsed, "none", None)


def _exists(target: str, root: Path) -> bool:
    path = Path(target)
    return (path if path.is_absolute() else Path(root) / path).exists()


def resolve_path(source: ModelSource, path: Path) -> ResolvedModel:
    if not path.exists():
        raise FileNotFoundError(f"{source.text}: no such folder or file ({path})")
    if path.is_file():
        return ResolvedModel(source, "weights", path)
    if ckpt.is_complete(path) or ckpt.latest_checkpoint(path) is not None:
        return ResolvedModel(source, "checkpoint", path)
    if is_backbone_dir(path):
        return ResolvedModel(source, "backbone", path, path)
    backbone = find_backbone_dir(path)  # raises for a folder with nothing usable in it
    return ResolvedModel(source, "pyfunc" if (path / MLMODEL_FILE).is_file() else "backbone", path, backbone)


def default_client(client: Any | None = None) -> Any:
    """``client`` or an ``MlflowClient`` on the current tracking / registry URI."""
    if client is not None:
        return client
    from mlflow import MlflowClient

    return MlflowClient()


def client_tracking_uri(client: Any) -> str | None:
    """The server a client talks to (None for a stand-in without one: MLflow's current URI then)."""
    uri = getattr(client, "tracking_uri", None)
    return uri if isinstance(uri, str) else None


def registry_version(client: Any, uri: str | ModelSource) -> Any:
    """The ``ModelVersion`` that ``uri`` names (alias or number)."""
    ref = (parse_source(uri) if isinstance(uri, str) else uri).require("registry")
    if ref.alias is not None:
        return client.get_model_version_by_alias(ref.name, ref.alias)
    return client.get_model_version(ref.name, str(ref.version))


def resolve_version(source: ModelSource, cache_dir: Path, client: Any | None = None) -> ResolvedModel:
    client = default_client(client)
    version = registry_version(client, source)
    artifact_source = str(version.source)
    folder = f"{version.version}-{hashlib.sha256(artifact_source.encode()).hexdigest()[:10]}"
    directory = download_once(artifact_source, Path(cache_dir) / safe_name(str(version.name)) / folder,
                              client_tracking_uri(client))
    return ResolvedModel(
        source=source, layout="pyfunc" if (directory / MLMODEL_FILE).is_file() else "backbone",
        directory=directory, backbone_dir=find_backbone_dir(directory), name=str(version.name),
        version=str(version.version), run_id=version.run_id or None, artifact_source=artifact_source,
        aliases=sorted(version.aliases or []), tags=dict(version.tags or {}),
    )


def resolve_model_uri(uri: str, cache_dir: Path, client: Any | None = None) -> ResolvedModel:
    """A registry URI only (kept for callers that refuse local paths)."""
    return resolve_version(parse_source(uri).require("registry"), cache_dir, client)


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def download_once(source: str, target: Path, tracking_uri: str | None = None) -> Path:
    """The artifacts at ``source`` in ``target``; an existing ``target`` is complete (see module doc).

    ``tracking_uri`` (default: MLflow's current one) also serves as the registry URI: a pyfunc version's
    source is a ``models:/m-...`` URI that only that server can resolve."""
    import mlflow

    if target.is_dir():
        return target
    return staged_download(target, lambda staging: Path(mlflow.artifacts.download_artifacts(
        artifact_uri=source, dst_path=str(staging), tracking_uri=tracking_uri, registry_uri=tracking_uri)))


def staged_download(target: Path, download: Callable[[Path], Path], replace: bool = False) -> Path:
    """``download(staging)`` into a staging folder beside ``target``, then renamed into place, so
    ``target`` is complete or absent. An existing ``target`` (another process finished first) is kept,
    unless ``replace`` (it was found incomplete)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        local = download(staging)
        if target.exists():
            if not replace:
                return target  # theirs is as good as ours
            shutil.rmtree(target)
        os.replace(local, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def version_checkpoint(model: ResolvedModel, cache_dir: Path, client: Any | None = None) -> Path | None:
    """The training checkpoint (with heads) the run behind a registry version logged, if it logged one;
    downloaded once into ``cache_dir/NAME/VERSION-checkpoint-RUN`` (staging folder, then rename)."""
    import mlflow

    if not model.from_registry or model.run_id is None or model.name is None:
        return None
    client = default_client(client)
    if not client.list_artifacts(model.run_id, CHECKPOINT_ARTIFACT):
        return None
    target = Path(cache_dir) / safe_name(model.name) / f"{model.version}-checkpoint-{model.run_id[:12]}"
    if ckpt.is_complete(target):
        return target
    run_id, tracking_uri = model.run_id, client_tracking_uri(client)
    staged_download(target, lambda staging: Path(mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(staging), tracking_uri=tracking_uri)),
        replace=True)
    return target if ckpt.is_complete(target) else None
