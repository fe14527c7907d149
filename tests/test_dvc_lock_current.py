"""The committed ``dvc.lock`` matches the committed code and params, so ``make demo`` leaves git clean.

The stages' outputs are the same in every checkout (tests/test_portable_manifests.py,
tests/test_training_determinism.py, tests/test_checkpoint.py), so the only way a fresh clone's
``make demo`` can rewrite ``dvc.lock`` is a dependency that no longer hashes to what the lock
records: a code or params change committed without refreshing the lock. This hashes every
git-tracked dependency of every stage with DVC's own hashing and compares it with the lock. Data
and outputs (not in git) are compared by the demo itself, not here.

To refresh the lock after changing a stage's code or params: ``make demo`` in a fresh clone (or
``dvc repro`` in a checkout whose outputs are current), then commit its ``dvc.lock``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def tracked_files(root: Path) -> set[str]:
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout: the lock is compared with the committed files")
    listing = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True)
    return set(listing.stdout.split())


def is_tracked(path: str, tracked: set[str]) -> bool:
    return path in tracked or any(name.startswith(path.rstrip("/") + "/") for name in tracked)


def stale_dependencies(root: Path) -> list[str]:
    """'stage: path (what is wrong)' for each git-tracked dependency whose hash or values differ from the lock."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo
    from dvc.utils.serialize import load_yaml

    tracked = tracked_files(root)
    # DVC's own YAML reader: PyYAML would read a lock value such as 1e-05 as a string.
    lock: dict[str, Any] = load_yaml(str(root / "dvc.lock"))["stages"]
    stale = []
    with Repo(str(root)) as repo:
        for stage in repo.stage.collect():
            if stage.name not in lock:
                stale.append(f"{stage.name}: not in dvc.lock")
                continue
            recorded = lock[stage.name]
            md5s = {dep["path"]: dep.get("md5") for dep in recorded.get("deps", [])}
            for dep in stage.deps:
                path = str(dep.def_path)
                if not is_tracked(path, tracked):
                    continue  # data and upstream outputs: not in git
                dep.save()
                value = dep.hash_info.value
                if isinstance(dep, ParamsDependency):
                    if value != recorded.get("params", {}).get(path):
                        stale.append(f"{stage.name}: {path} (params differ from the lock)")
                elif md5s.get(path) != value:
                    stale.append(f"{stage.name}: {path} (md5 {value}, lock {md5s.get(path)})")
    return stale


def test_the_committed_lock_matches_the_committed_code_and_params() -> None:
    stale = stale_dependencies(REPO_ROOT)
    assert not stale, ("dvc.lock is stale, so `make demo` on a fresh clone would rewrite it (refresh it as "
                       f"this module's docstring says): {stale}")


def test_byte_code_beside_the_sources_does_not_change_a_code_hash(tmp_path: Path) -> None:
    """Most machines write __pycache__ next to the sources (this one sets PYTHONDONTWRITEBYTECODE):
    .dvcignore must keep it out of the directory hashes, or every checkout hashes differently."""
    from dvc.repo import Repo

    root = tmp_path / "proj"
    (root / "code").mkdir(parents=True)
    (root / "code" / "a.py").write_text("x = 1\n")
    shutil.copy(REPO_ROOT / ".dvcignore", root / ".dvcignore")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"s": {"cmd": "true", "deps": ["code"]}}}))
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    Repo.init(str(root))

    def code_hash() -> str:
        with Repo(str(root)) as repo:
            dep = repo.stage.collect()[0].deps[0]
            dep.save()
            return str(dep.hash_info.value)

    before = code_hash()
    (root / "code" / "__pycache__").mkdir()
    (root / "code" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00 byte code with an mtime")
    assert code_hash() == before
    (root / "code" / "b.py").write_text("y = 2\n")
    assert code_hash() != before  # and the hash does follow the sources
