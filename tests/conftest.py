"""Shared fixtures. Every test runs with its own state folder so nothing leaks into the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.environment import apply_environment

REPO_ROOT = Path(__file__).resolve().parents[1]
CEPH_SCRIPT = REPO_ROOT / "infra" / "s3" / "ceph-rgw.sh"


def pytest_configure(config: pytest.Config) -> None:
    # One state folder for the whole session (Prefect's database and MLflow's SQLite live there),
    # applied before any test imports Prefect or MLflow.
    state = Path(os.environ.get("DINOFLOW_TEST_STATE") or (REPO_ROOT / ".dinoflow" / "test-state"))
    if state.exists() and not os.environ.get("DINOFLOW_TEST_STATE"):
        shutil.rmtree(state, ignore_errors=True)
    os.environ["DINOFLOW_HOME"] = str(state)
    # One intra-op thread per process: the tests' models are tiny, and with 2 cores two spinning OpenMP
    # threads (next to DataLoader workers, torchrun ranks and servers) slow them down 5-20x.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Prefect's console log handler writes to `ext://sys.stderr` as it is when Prefect configures logging,
    # which under pytest is pytest's capture stream (or a test's capsys buffer). Pytest closes those, and
    # Prefect still logs after that: at interpreter exit (atexit) it stops its temporary API server
    # ("Stopping temporary server on ...") and drains its log queues, which printed a "--- Logging error ---
    # ValueError: I/O operation on closed file" traceback at the end of every session that ran a flow in
    # process (PrefectHQ/prefect#16626, #14845). The process's own stderr is never closed; pytest's fd-level
    # capture still captures what is written to it during a test.
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_STREAM", "ext://sys.__stderr__")
    apply_environment()


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-model tests, whatever OMP_NUM_THREADS says; restored after.

    On a shared 2-core machine the second thread's workers spin while another process holds the core,
    which made such modules 5-20x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real S3-compatible server (Ceph RGW) on 127.0.0.1 for this test session.

    Started by the project's own script; skipped loudly only when Ceph cannot be installed here.
    """
    install = subprocess.run(["bash", str(CEPH_SCRIPT), "install"], capture_output=True, text=True, check=False)
    if install.returncode != 0:
        pytest.skip(f"S3 TESTS SKIPPED: Ceph RGW could not be installed: {install.stderr.strip()[-500:]}")
    folder = tmp_path_factory.mktemp("ceph-rgw")
    started = subprocess.run(["bash", str(CEPH_SCRIPT), "start", str(folder)], capture_output=True, text=True,
                             check=False, timeout=300)
    if started.returncode != 0:
        raise RuntimeError(f"Ceph RGW failed to start:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
    env = dict(line.split("=", 1) for line in (folder / "env").read_text().split() if "=" in line)
    try:
        yield env
    finally:
        subprocess.run(["bash", str(CEPH_SCRIPT), "stop", str(folder)], capture_output=True, check=False)


@pytest.fixture
def s3_env(s3_server: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The S3 server's endpoint and credentials in the environment (boto3's normal chain)."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture
def bucket_uri(s3_env: dict[str, str]) -> str:
    return f"s3://dinoflow-test-{uuid.uuid4().hex[:12]}/some/prefix"
