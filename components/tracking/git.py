"""The code version of a run: git SHA and whether the work tree had uncommitted changes."""

from __future__ import annotations

import subprocess
from pathlib import Path


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_tags(root: Path) -> dict[str, str]:
    """``{'git_sha': ..., 'git_dirty': 'true'|'false'}``, or ``{}`` outside a git checkout."""
    sha = _git(["rev-parse", "HEAD"], root)
    if not sha:
        return {}
    status = _git(["status", "--porcelain", "--untracked-files=no"], root)
    return {"git_sha": sha, "git_dirty": "true" if status else "false"}
