"""``models:/NAME@ALIAS`` and ``models:/NAME/VERSION`` -> the version's files in a local cache folder.

A registered version is one of two layouts, and both resolve to a backbone folder
(``config.json`` + ``model.safetensors``):

- ``backbone``: the plain backbone folder (what ``pretrain`` registered first);
- ``pyfunc``: an MLflow pyfunc model logged from code (components/serving), whose ``artifacts/``
  hold the same backbone folder.

A version's files never change, so they are downloaded once: into a staging folder renamed into
place, which makes an existing target folder a complete one. The folder name carries a hash of the
version's source, so version 3 of the same name on another server is another folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from components.evaluate.config import parse_registry_uri
from components.models.export import CONFIG_FILE, FORMAT, WEIGHTS_FILE

ModelKind = Literal["backbone", "pyfunc"]
MLMODEL_FILE = "MLmodel"


@dataclass(frozen=True)
class ResolvedModel:
    uri: str  # as given
    name: str
    version: str
    directory: Path  # the version's files, downloaded
    backbone_dir: Path  # the backbone folder inside (``directory`` itself for the plain layout)
    kind: ModelKind
    source: str  # the version's artifact source URI
    run_id: str | None
    aliases: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)  # the version's tags


def registry_version(client: Any, uri: str) -> Any:
    """The ``ModelVersion`` that ``uri`` names (alias or number)."""
    ref = parse_registry_uri(uri)
    if ref.alias is not None:
        return client.get_model_version_by_alias(ref.name, ref.alias)
    return client.get_model_version(ref.name, str(ref.version))


def resolve_model_uri(uri: str, cache_dir: Path, client: Any | None = None) -> ResolvedModel:
    """Download (once) the version ``uri`` names into ``cache_dir/<name>/<version>-<hash>``."""
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    version = registry_version(client, uri)
    source = str(version.source)
    folder = f"{version.version}-{hashlib.sha256(source.encode()).hexdigest()[:10]}"
    directory = download_once(source, Path(cache_dir) / safe_name(str(version.name)) / folder)
    backbone_dir = find_backbone_dir(directory)
    return ResolvedModel(
        uri=uri, name=str(version.name), version=str(version.version), directory=directory,
        backbone_dir=backbone_dir, kind="pyfunc" if (directory / MLMODEL_FILE).is_file() else "backbone",
        source=source, run_id=version.run_id or None, aliases=sorted(version.aliases or []),
        tags=dict(version.tags or {}),
    )


def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def download_once(source: str, target: Path) -> Path:
    """The artifacts at ``source`` in ``target``; an existing ``target`` is complete (see module doc)."""
    import mlflow

    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(staging)))
        if target.exists():  # another process finished first: theirs is as good as ours
            return target
        os.replace(local, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def is_backbone_dir(folder: Path) -> bool:
    config = folder / CONFIG_FILE
    if not config.is_file() or not (folder / WEIGHTS_FILE).is_file():
        return False
    try:
        return bool(json.loads(config.read_text()).get("format") == FORMAT)
    except (json.JSONDecodeError, AttributeError):
        return False


def find_backbone_dir(folder: Path) -> Path:
    """``folder`` itself if it is a backbone folder, else the shallowest backbone folder below it
    (a pyfunc model keeps its backbone under ``artifacts/``)."""
    folder = Path(folder)
    if is_backbone_dir(folder):
        return folder
    candidates = sorted((p.parent for p in folder.rglob(CONFIG_FILE) if is_backbone_dir(p.parent)),
                        key=lambda p: (len(p.relative_to(folder).parts), str(p)))
    if not candidates:
        raise FileNotFoundError(f"{folder}: holds no dinoflow backbone ({CONFIG_FILE} + {WEIGHTS_FILE})")
    return candidates[0]
