"""A real full disk during a checkpoint write: a size-limited tmpfs holds the run's checkpoints. The write
fails with an error that says what happened, the previous checkpoint stays the newest complete one, no
partial folder is left, and once there is space the same run resumes from it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.train.checkpoint import DiskFullError, latest_checkpoint
from components.train.engine import run_pretraining
from tests.test_pretrain_engine import CPU, tiny_config, write_pool

PAGE = 4096


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted on a folder of the test (needs root, as CI has; skipped with the reason otherwise)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def resize(mount: Path, size_bytes: int) -> None:
    pages = -(-size_bytes // PAGE)
    subprocess.run(["mount", "-o", f"remount,size={pages * PAGE}", str(mount)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a size-limited tmpfs needs root")
def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tmp_path: Path, small_disk: Path) -> None:
    manifest = write_pool(tmp_path, corrupt=False)
    probe = tiny_config(manifest, tmp_path / "probe", iterations=2)
    run_pretraining(probe, CPU, tmp_path)
    one = folder_bytes(tmp_path / "probe" / "checkpoints" / "step_000000002")
    shutil.rmtree(tmp_path / "probe")
    resize(small_disk, int(one * 1.5))  # room for one checkpoint, not for a second one beside it
    cfg = tiny_config(manifest, small_disk / "out", iterations=6)  # checkpoints at steps 2, 4, 6
    with pytest.raises(DiskFullError) as raised:
        run_pretraining(cfg, CPU, tmp_path)
    message = str(raised.value)
    checkpoints = small_disk / "out" / "checkpoints"
    assert "step 4 not written: no space left" in message
    assert f"the newest complete checkpoint is still {checkpoints / 'step_000000002'}" in message
    assert "rerun the same command" in message and raised.value.errno == 28
    assert latest_checkpoint(checkpoints) == checkpoints / "step_000000002"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_000000002"]  # the partial one was removed
    resize(small_disk, one * 4)  # space freed: the same run resumes from step 2 and finishes
    result, _ = run_pretraining(cfg, CPU, tmp_path)
    assert result.start_step == 2 and result.finished
    assert latest_checkpoint(checkpoints) == checkpoints / "step_000000006"
