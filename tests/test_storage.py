"""Object store contract, run against the local backend and a real S3-compatible server."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.storage import (
    InvalidKeyError,
    LocalObjectStore,
    ObjectNotFoundError,
    ObjectStore,
    S3ObjectStore,
    open_store,
    read_uri,
)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "local":
        yield LocalObjectStore(tmp_path / "store")
    else:
        uri = request.getfixturevalue("bucket_uri")
        yield open_store(uri, create_bucket=True)


def test_round_trip(store: ObjectStore) -> None:
    payload = bytes(range(256)) * 10
    store.write("a/b/c.bin", payload)
    assert store.exists("a/b/c.bin")
    assert store.read("a/b/c.bin") == payload
    store.write("a/b/c.bin", b"new")
    assert store.read("a/b/c.bin") == b"new"
    assert read_uri(store.url_for("a/b/c.bin")) == b"new"


def test_missing_key(store: ObjectStore) -> None:
    assert not store.exists("nothing/here.png")
    with pytest.raises(ObjectNotFoundError, match=r"nothing/here\.png"):
        store.read("nothing/here.png")
    store.delete("nothing/here.png")  # deleting a missing key is fine


def test_list_is_sorted_prefix_match_and_paginates(store: ObjectStore) -> None:
    keys = [f"pool/img-{i:04d}.png" for i in range(1005)]  # > 1000: S3 returns it in two pages
    if isinstance(store, LocalObjectStore):
        keys = keys[:50]
    for key in keys:
        store.write(key, b"x")
    store.write("pool2/other.png", b"y")
    store.write("top.txt", b"z")
    assert list(store.list("pool/")) == sorted(keys)
    assert list(store.list("pool/img-000")) == sorted(keys)[:10]
    assert set(store.list("pool")) == {*keys, "pool2/other.png"}
    assert "top.txt" in set(store.list())


def test_file_transfer(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    source.write_bytes(b"\x01\x02" * (6 * 1024 * 1024))  # 12 MiB: multipart on S3
    store.upload_file("ckpt/big.bin", source)
    target = tmp_path / "out" / "copy.bin"
    store.download_file("ckpt/big.bin", target)
    assert target.read_bytes() == source.read_bytes()
    assert not [p for p in target.parent.iterdir() if p.name != "copy.bin"], "no temp file left behind"
    with pytest.raises(ObjectNotFoundError):
        store.download_file("ckpt/missing.bin", tmp_path / "never.bin")
    assert not (tmp_path / "never.bin").exists()


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "dir/", "./a"])
def test_bad_keys_are_rejected(store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidKeyError):
        store.write(key, b"x")


def test_reader_never_sees_a_partial_object(store: ObjectStore) -> None:
    """Readers racing a writer of large objects see only the whole old or whole new value."""
    size = 4 * 1024 * 1024
    versions = [bytes([v]) * size for v in range(4)]
    store.write("race.bin", versions[0])
    stop = threading.Event()
    bad: list[str] = []

    def reader() -> None:
        while not stop.is_set():
            data = store.read("race.bin")
            if data not in versions:
                bad.append(f"len={len(data)} first={data[:1]!r} last={data[-1:]!r}")

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for version in versions[1:] * 2:
            store.write("race.bin", version)
    finally:
        stop.set()
        thread.join()
    assert not bad


def test_local_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between writing and publishing leaves no object and no visible temp file."""
    store = LocalObjectStore(tmp_path / "s")
    store.write("keep.bin", b"old")

    def boom(src: object, dst: object) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr("components.storage.local.os.replace", boom)
    with pytest.raises(OSError, match="disk gone"):
        store.write("keep.bin", b"new")
    with pytest.raises(OSError):
        store.write("fresh.bin", b"new")
    monkeypatch.undo()
    assert store.read("keep.bin") == b"old"
    assert not store.exists("fresh.bin")
    assert list(store.list()) == ["keep.bin"]
    assert not list((tmp_path / "s" / ".tmp").iterdir())


def test_open_store_dispatch(tmp_path: Path) -> None:
    assert isinstance(open_store(tmp_path / "x"), LocalObjectStore)
    assert isinstance(open_store((tmp_path / "a b").as_uri()), LocalObjectStore)
    assert open_store((tmp_path / "a b").as_uri()).uri == (tmp_path / "a b").as_uri()
    with pytest.raises(ValueError, match="unsupported object store URI"):
        open_store("gs://bucket/x")


@pytest.mark.s3
def test_s3_repr_never_shows_credentials(s3_env: dict[str, str], bucket_uri: str) -> None:
    store = S3ObjectStore(bucket_uri, create_bucket=True)
    text = repr(store)
    assert s3_env["AWS_SECRET_ACCESS_KEY"] not in text and s3_env["AWS_ACCESS_KEY_ID"] not in text
    assert store.uri == bucket_uri
