"""``dinoflow models list|show|pull`` as plain functions returning JSON-ready dicts.

Each takes an optional ``MlflowClient`` (default: the current tracking / registry URI) so that the
command line, Prefect flows and tests call the same code.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from components.models.export import find_backbone_dir
from components.registry.lineage import run_lineage
from components.registry.resolve import client_tracking_uri, default_client, download_once, registry_version
from components.registry.uri import registry_uri


def version_summary(version: Any, aliases: list[str] | None = None) -> dict[str, Any]:
    return {
        "version": str(version.version),
        "aliases": sorted(version.aliases or []) if aliases is None else sorted(aliases),
        "run_id": version.run_id or None,
        "source": version.source,
        "status": version.status,
        "created": version.creation_timestamp,
        "tags": dict(sorted((version.tags or {}).items())),
    }


def list_models(client: Any | None = None) -> dict[str, Any]:
    """Every registered model with its aliases and versions (newest first)."""
    client = default_client(client)
    models = []
    for model in paged(client.search_registered_models):
        versions = paged(lambda page_token=None, name=model.name: client.search_model_versions(
            f"name = '{escape(name)}'", page_token=page_token))
        versions = sorted(versions, key=lambda v: int(v.version), reverse=True)
        aliases = {alias: str(number) for alias, number in sorted((model.aliases or {}).items())}
        # search_model_versions leaves ModelVersion.aliases empty: the model's alias map is the truth.
        by_version: dict[str, list[str]] = {}
        for alias, number in aliases.items():
            by_version.setdefault(number, []).append(alias)
        models.append({
            "name": model.name,
            "description": model.description or "",
            "aliases": aliases,
            "versions": [version_summary(v, by_version.get(str(v.version), [])) for v in versions],
        })
    return {"models": sorted(models, key=lambda m: m["name"])}


def show_model(uri: str, client: Any | None = None) -> dict[str, Any]:
    """One version (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``; ``models:/`` may be left out)
    with its source run's lineage."""
    client = default_client(client)
    uri = registry_uri(uri)
    version = registry_version(client, uri)
    return {"uri": uri, "name": version.name, **version_summary(version),
            "description": version.description or "", "lineage": run_lineage(client, version.run_id)}


PullFormat = Literal["registry", "hf", "timm"]


def pull_model(uri: str, dest: Path, client: Any | None = None, overwrite: bool = False,
               fmt: PullFormat = "registry") -> dict[str, Any]:
    """Download a version's files into ``dest`` (which must not exist or be empty unless ``overwrite``).

    ``fmt``: ``registry`` keeps the version's own files (backbone folder or pyfunc model); ``hf`` writes a
    folder ``transformers.AutoModel.from_pretrained(dest)`` loads; ``timm`` writes ``model.safetensors``
    (timm keys) and ``model.timm.json`` (``timm.create_model`` name and kwargs). Both exports are checked
    against the backbone before they are kept (components/models/{hf,timm}_export.py)."""
    if fmt != "registry":
        return pull_exported(uri, Path(dest), client, overwrite, fmt)
    client = default_client(client)
    uri = registry_uri(uri)
    version = registry_version(client, uri)
    dest = Path(dest).resolve()
    with staged_destination(dest, overwrite) as scratch:
        swap_in(download_once(str(version.source), scratch / "files", client_tracking_uri(client)), dest)
    backbone = find_backbone_dir(dest)
    return {"uri": uri, "name": version.name, "version": str(version.version), "dest": str(dest),
            "kind": "pyfunc" if (dest / "MLmodel").is_file() else "backbone", "backbone_dir": str(backbone),
            "files": sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())}


@contextlib.contextmanager
def staged_destination(dest: Path, overwrite: bool) -> Iterator[Path]:
    """A scratch folder beside ``dest`` (removed afterwards): work is staged there and swapped in whole, so
    an interrupted pull never leaves a half-filled ``dest``. A non-empty ``dest`` needs ``overwrite``."""
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} is not empty (pass overwrite / --force to replace it)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.pull-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def swap_in(finished: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(finished, dest)


def pull_exported(uri: str, dest: Path, client: Any | None, overwrite: bool, fmt: PullFormat) -> dict[str, Any]:
    dest = Path(dest).resolve()
    with staged_destination(dest, overwrite) as scratch:
        pulled = pull_model(uri, scratch / "version", client)
        backbone = Path(pulled["backbone_dir"])
        staged = scratch / "export"
        extra: dict[str, Any]
        if fmt == "hf":
            from components.models.hf_export import export_hf

            hf = export_hf(backbone, staged)
            extra = {"model_class": hf.model_class, "max_abs_diff": hf.max_abs_diff}
        else:
            from components.models.timm_export import export_timm

            staged.mkdir()
            timm = export_timm(backbone, staged / "model.safetensors")
            extra = {"timm_model": timm.model_name, "timm_kwargs": timm.model_kwargs,
                     "max_abs_diff": timm.max_abs_diff}
        swap_in(staged, dest)  # a finished, verified export or nothing
    return {"uri": pulled["uri"], "name": pulled["name"], "version": pulled["version"], "dest": str(dest),
            "format": fmt, **extra, "files": sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())}


def escape(name: str) -> str:
    return name.replace("'", "\\'")


def paged(search: Any) -> list[Any]:
    """All pages of an MLflow ``search_*`` call."""
    items: list[Any] = []
    token = None
    while True:
        page = search(page_token=token) if token else search()
        items.extend(page)
        token = getattr(page, "token", None)
        if not token:
            return items
