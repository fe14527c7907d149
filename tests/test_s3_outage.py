"""The S3 server goes away in the middle of work and comes back: curation ingest and checkpoint mirroring
finish, nothing is lost or turned into a reject, and the counts reconcile with the listing.

A private Ceph cluster (infra/s3/ceph-rgw.sh, started here, not the session's shared one) keeps its
monitor and OSD running while only radosgw is stopped and started again on the same port
(``stop-rgw`` / ``start-rgw``): the objects survive and clients see connection refusals for as long as
the outage lasts. botocore's own retries (5, jittered, about 15 s on average and 31 s at most) do not
cover an outage of that length reliably, least of all with eight threads reading at once; the store's
time-budgeted retries (components/storage/retry.py) do, and an outage longer than the budget fails the
run with :class:`StoreUnavailableError` instead of rejecting the files it could not read.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from components.curation import reasons
from components.curation.ingest import IngestConfig, ingest_pool
from components.storage import ObjectStore, S3ObjectStore, StoreUnavailableError, open_store
from components.storage.retry import RETRY_SECONDS_ENV
from components.train.checkpoint import MARKER_NAME, list_files, step_dir_name
from components.train.engine import run_pretraining
from tests.conftest import CEPH_SCRIPT
from tests.test_pretrain_engine import CPU, tiny_config, write_pool

pytestmark = pytest.mark.s3

N_IMAGES = 240
DOWN_AFTER_READS = 60  # the gateway is stopped once this many images were read: a quarter of the pool
INGEST_DOWN_FOR_S = 15.0  # eight readers at once: botocore alone almost surely rejects some files
MIRROR_DOWN_AT_STEP = 4  # the checkpoint of this step is mirrored while the gateway is down
MIRROR_DOWN_FOR_S = 25.0  # one writer: botocore alone gives up before this in about 97% of runs
PLANTED_REJECTS = {  # key -> the reason a healthy run gives it; the outage must not add any
    "bad/cut.png": reasons.TRUNCATED,
    "bad/empty.png": reasons.ZERO_BYTES,
    "bad/notes.jpg": reasons.NOT_AN_IMAGE,
    "zz/copy-of-0000.png": reasons.EXACT_DUPLICATE,
}


def run_script(command: str, folder: Path, timeout: float = 300) -> None:
    done = subprocess.run(["bash", str(CEPH_SCRIPT), command, str(folder)], capture_output=True, text=True,
                          check=False, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"ceph-rgw.sh {command} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


@dataclass
class Gateway:
    """The private cluster's radosgw, which the tests stop and start; the data lives in the OSD."""

    folder: Path
    env: dict[str, str]

    def stop(self) -> None:
        run_script("stop-rgw", self.folder)

    def start(self) -> None:
        run_script("start-rgw", self.folder)


@dataclass
class Outage:
    """Stops the gateway when :meth:`begin` is called and brings it back ``seconds`` later from a thread."""

    gateway: Gateway
    seconds: float
    began_at: float | None = None
    ended_at: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def begin(self) -> None:
        with self._lock:  # called from reader threads: only the first call stops the gateway
            if self.began_at is not None:
                return
            self.gateway.stop()  # synchronous: the caller goes on only once requests are refused
            self.began_at = time.monotonic()
            self._thread = threading.Thread(target=self._restore, name="gateway-restore", daemon=True)
            self._thread.start()

    def _restore(self) -> None:
        time.sleep(self.seconds)
        self.gateway.start()
        self.ended_at = time.monotonic()

    def wait(self) -> None:
        assert self._thread is not None, "the outage never began: the trigger did not fire"
        self._thread.join(timeout=self.seconds + 120)
        assert self.ended_at is not None, "the gateway did not come back"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    install = subprocess.run(["bash", str(CEPH_SCRIPT), "install"], capture_output=True, text=True, check=False)
    if install.returncode != 0:
        pytest.skip(f"S3 TESTS SKIPPED: Ceph RGW could not be installed: {install.stderr.strip()[-500:]}")
    folder = tmp_path_factory.mktemp("ceph-rgw-outage")
    run_script("start", folder)
    env = dict(line.split("=", 1) for line in (folder / "env").read_text().split() if "=" in line)
    try:
        with pytest.MonkeyPatch.context() as patch:  # its endpoint and credentials, for this module only
            for key, value in env.items():
                patch.setenv(key, value)
            yield Gateway(folder, env)
    finally:
        run_script("stop", folder)


@pytest.fixture
def gateway_env(gateway: Gateway) -> Gateway:
    """The private gateway, up: a previous test that failed in the middle of an outage may have left it down."""
    gateway.start()  # idempotent
    return gateway


def new_bucket(name: str) -> str:
    return f"s3://{name}-{uuid.uuid4().hex[:10]}"


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class Pool:
    uri: str
    objects: dict[str, bytes]  # key -> bytes, as uploaded


@pytest.fixture(scope="module")
def s3_pool(gateway: Gateway) -> Pool:
    """N_IMAGES distinct small PNGs plus the planted rejects in a bucket of the private gateway (read-only)."""
    uri = new_bucket("pool")
    return Pool(uri, write_s3_pool(open_store(uri, create_bucket=True)))


def write_s3_pool(store: ObjectStore) -> dict[str, bytes]:
    rng = np.random.default_rng(16)
    objects = {f"img/{i:04d}.png": png((rng.random((12, 12)) * 255).astype(np.uint8)) for i in range(N_IMAGES)}
    first = objects["img/0000.png"]
    objects |= {"bad/cut.png": first[: len(first) // 2], "bad/empty.png": b"",
                "bad/notes.jpg": b"shopping list, not a picture\n", "zz/copy-of-0000.png": first}
    for key, data in objects.items():
        store.write(key, data)
    return objects


class ReadCounter:
    """Counts the GetObject calls that succeeded (botocore's own event hook on the store's client) and
    calls ``when_due`` in the reader thread of call number ``at``; counts those after ``resumed()`` too."""

    def __init__(self, at: int, when_due: Callable[[], None], resumed: Callable[[], bool]) -> None:
        self.at, self.when_due, self.resumed = at, when_due, resumed
        self.count = 0
        self.after_outage = 0
        self._lock = threading.Lock()

    def __call__(self, http_response: Any, **_: Any) -> None:
        if http_response is None or http_response.status_code != 200:
            return
        with self._lock:
            self.count += 1
            due = self.count == self.at
            if self.resumed():
                self.after_outage += 1
        if due:
            self.when_due()

    def opener(self, pool: str) -> ObjectStore:
        """``ingest_pool``'s store opener: the real store, its client reporting each read here."""
        store = open_store(pool)
        assert isinstance(store, S3ObjectStore)
        store.client.meta.events.register("after-call.s3.GetObject", self)
        return store


def test_ingest_survives_a_gateway_restart_and_rejects_nothing_for_it(
        gateway_env: Gateway, s3_pool: Pool, caplog: pytest.LogCaptureFixture) -> None:
    objects = s3_pool.objects
    outage = Outage(gateway_env, INGEST_DOWN_FOR_S)
    counter = ReadCounter(DOWN_AFTER_READS, outage.begin, resumed=lambda: outage.ended_at is not None)

    cfg = IngestConfig(pool=s3_pool.uri, workers=8, batch_size=32)
    with caplog.at_level(logging.WARNING, logger="components.storage"):
        result = ingest_pool(cfg, store_opener=counter.opener)
    outage.wait()

    assert counter.after_outage > 0, "the outage fell in the middle of the reads"
    rejected = dict(zip(result.rejected["key"].to_list(), result.rejected["reason"].to_list(), strict=True))
    assert reasons.UNREADABLE not in rejected.values(), "an outage turned images into rejects"
    assert rejected == PLANTED_REJECTS
    kept = set(result.kept["key"].to_list())
    assert kept == set(objects) - set(PLANTED_REJECTS)
    assert kept.isdisjoint(rejected) and len(kept) + len(rejected) == len(objects)
    by_key = dict(zip(result.kept["key"].to_list(), result.kept["sha256"].to_list(), strict=True))
    assert all(by_key[key] == hashlib.sha256(objects[key]).hexdigest() for key in kept)  # the bytes, not a part
    steps = result.stats["steps"]
    assert steps == {"listed": len(objects), "valid": len(objects) - 3, "kept": len(kept), "rejected": len(rejected)}
    assert "unreachable" in caplog.text and "reachable again" in caplog.text  # the operator was told


def test_an_outage_longer_than_the_retry_budget_stops_ingest_instead_of_rejecting(
        gateway_env: Gateway, s3_pool: Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RETRY_SECONDS_ENV, "2")
    counter = ReadCounter(DOWN_AFTER_READS, gateway_env.stop, resumed=lambda: False)  # down for good
    cfg = IngestConfig(pool=s3_pool.uri, workers=8, batch_size=32)
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailableError, match=f"kept failing .* {RETRY_SECONDS_ENV}=SECONDS"):
            ingest_pool(cfg, store_opener=counter.opener)
    finally:
        gateway_env.start()
    # Each reader gave up after the budget, plus botocore's few quick retries: not a wait per file.
    assert time.monotonic() - started < 60


def mirrored_files(store: ObjectStore, prefix: str, step: int) -> dict[str, bytes]:
    base = f"{prefix}/{step_dir_name(step)}/"
    return {key[len(base):]: store.read(key) for key in store.list(base)}


def test_checkpoint_mirroring_survives_a_gateway_restart_and_resumes_from_the_mirror(
        gateway_env: Gateway, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    manifest = write_pool(tmp_path, corrupt=False)
    store = open_store(new_bucket("ckpt"), create_bucket=True)
    cfg = tiny_config(manifest, tmp_path / "out", iterations=6)  # checkpoints at steps 2, 4 and 6
    cfg.checkpoint.store_prefix = "ckpt/run1"
    cfg.checkpoint.keep_last = 3  # every checkpoint stays local, to compare with its mirror
    outage = Outage(gateway_env, MIRROR_DOWN_FOR_S)

    def down_before_the_save(steps_done: int, _: object) -> bool:
        if steps_done == MIRROR_DOWN_AT_STEP:
            outage.begin()  # returns once the gateway refuses connections; the save comes next
        return False

    with caplog.at_level(logging.WARNING, logger="components.storage"):
        result, _ = run_pretraining(cfg, CPU, tmp_path, store=store, after_step=down_before_the_save)
    outage.wait()

    assert result.finished and result.end_step == 6
    local = tmp_path / "out" / "checkpoints"
    for step in (2, 4, 6):  # every mirror is whole: the same files with the same bytes as the local copy
        folder = local / step_dir_name(step)
        expected = {name: (folder / name).read_bytes() for name in [*list_files(folder), MARKER_NAME]}
        assert mirrored_files(store, "ckpt/run1", step) == expected, f"mirror of step {step}"
    assert "unreachable" in caplog.text and "reachable again" in caplog.text

    shutil.rmtree(tmp_path / "out")  # a new machine: only the mirror is left
    cfg.objective.optim.iterations = 8
    cfg.checkpoint.on_config_change = "resume"  # extending a finished schedule is a continuation by request
    resumed, _ = run_pretraining(cfg, CPU, tmp_path, store=store)
    assert resumed.start_step == 6 and resumed.finished and resumed.end_step == 8
    assert store.exists(f"ckpt/run1/{step_dir_name(8)}/{MARKER_NAME}")
