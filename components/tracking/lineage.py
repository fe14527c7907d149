"""Lineage tags for a stage's MLflow run: which DVC stage made it, from which exact inputs.

A run records the DVC stage of the same name (stages are named alike in ``dvc.yaml`` and in the
code), a digest over that stage's command, dependency hashes and parameter values computed the way
DVC computes them (so ``dvc.dep.<path>`` equals the md5 that ``dvc.lock`` records for the path
after ``dvc repro``), and, when DVC itself launched the command, the experiment name and baseline
revision it exports. A pipeline flow also makes each stage run a child of one parent run: the parent's
id travels in ``DINOFLOW_PARENT_RUN_ID``, so it crosses process boundaries (torchrun, DVC commands).

All of this is best effort: a checkout without DVC, or a stage missing from ``dvc.yaml``, gives a
run without these tags and a ``dvc.lineage_note`` saying why, never a failed stage.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

PARENT_RUN_ENV = "DINOFLOW_PARENT_RUN_ID"
# Set by DVC for the commands it runs (DVC_STAGE since DVC 3.49); copied to tags when present.
DVC_ENV_TAGS = {"DVC_STAGE": "dvc.env_stage", "DVC_EXP_NAME": "dvc.exp_name",
                "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}
# MLflow caps a tag value at 8000 characters (params at 6000); dependency hashes are far shorter.
_MAX_TAG_CHARS = 5000


def parent_run_tags() -> dict[str, str]:
    """``mlflow.parentRunId`` when a pipeline run is open (makes the stage run its child in the UI)."""
    parent = os.environ.get(PARENT_RUN_ENV, "").strip()
    return {"mlflow.parentRunId": parent} if parent else {}


def dvc_env_tags() -> dict[str, str]:
    return {tag: os.environ[var] for var, tag in DVC_ENV_TAGS.items() if os.environ.get(var)}


def _hash_value(hash_info: Any) -> Any:
    value = getattr(hash_info, "value", None)
    return value if value is not None else hash_info


def dvc_stage_tags(root: Path, stage: str) -> dict[str, str]:
    """``dvc.stage``, ``dvc.stage_hash`` and ``dvc.dep.<path>`` (md5) for the current inputs of ``stage``."""
    if not (root / "dvc.yaml").is_file():
        return {"dvc.lineage_note": f"no dvc.yaml in {root}"}
    try:
        from dvc.repo import Repo

        with Repo(str(root)) as repo:
            found = [s for s in repo.stage.collect() if getattr(s, "name", None) == stage]
            if not found:
                return {"dvc.lineage_note": f"dvc.yaml has no stage named {stage!r}"}
            return stage_digest_tags(stage, found[0])
    except Exception as exc:  # lineage must never fail the stage itself
        return {"dvc.lineage_note": f"could not hash DVC stage {stage!r}: {type(exc).__name__}: {exc}"[:500]}


def stage_digest_tags(name: str, stage: Any) -> dict[str, str]:
    """Hash each dependency as DVC does (``dep.save()`` fills ``hash_info``) and digest them with the command."""
    deps: dict[str, Any] = {}
    for dep in stage.deps:
        dep.save()
        deps[str(dep.def_path)] = _hash_value(dep.hash_info)
    payload = json.dumps({"cmd": stage.cmd, "deps": deps}, sort_keys=True, default=str)
    tags = {"dvc.stage": name, "dvc.stage_hash": hashlib.sha256(payload.encode()).hexdigest()}
    for path, value in deps.items():
        if isinstance(value, str):  # file and directory md5s; params are covered by the stage hash
            tags[f"dvc.dep.{path}"] = value[:_MAX_TAG_CHARS]
    return tags


def lineage_tags(root: Path, stage: str) -> dict[str, str]:
    """Every lineage tag for a stage run started now (parent run, DVC stage and environment)."""
    return {**parent_run_tags(), **dvc_stage_tags(root, stage), **dvc_env_tags()}


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """md5 of a file's bytes (the digest DVC records for a file output)."""
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


