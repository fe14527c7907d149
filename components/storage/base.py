"""The object-store interface every stage reads and writes through.

Keys are relative, '/'-separated paths (``pool/demo/train/000001.png``). A write is atomic: a
reader sees the whole old object, the whole new one, or nothing, never a partial object.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable


class ObjectNotFoundError(KeyError):
    """The key does not exist in the store."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "object not found"


class StoreUnavailableError(RuntimeError):
    """The store kept failing for longer than its retry budget (server down, unreachable or overloaded).

    Not a verdict on the object: callers must not record the object as bad (a curation reject, a
    skipped image) but stop, so that the run can be repeated once the store is back."""


class InvalidKeyError(ValueError):
    """A key that could escape the store root or is otherwise malformed."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a clean relative path, else raise :class:`InvalidKeyError`."""
    if not key or key.startswith("/") or key.endswith("/"):
        raise InvalidKeyError(f"object key must be a relative path to a file, got {key!r}")
    parts = key.split("/")
    if any(part in ("", ".", "..") for part in parts) or "\\" in key or "\x00" in key:
        raise InvalidKeyError(f"object key has an empty, '.' or '..' segment or a bad character: {key!r}")
    return key


def join_key(*parts: str) -> str:
    """Join key segments with '/', dropping empty ones and stray slashes."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


@runtime_checkable
class ObjectStore(Protocol):
    """Read, atomically write, list and test objects by key."""

    @property
    def uri(self) -> str:
        """The store's root URI, for example ``file:///data/store`` or ``s3://bucket/prefix``."""
        ...

    def url_for(self, key: str) -> str:
        """The full URI of ``key`` (root URI joined with the key)."""
        ...

    def read(self, key: str) -> bytes:
        """The object's bytes; raises :class:`ObjectNotFoundError` when absent."""
        ...

    def write(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` atomically, replacing any previous object."""
        ...

    def upload_file(self, key: str, path: Path) -> None:
        """Store a local file under ``key`` atomically, streaming (for files larger than RAM)."""
        ...

    def download_file(self, key: str, path: Path) -> None:
        """Copy the object to a local path atomically (the path appears only when complete)."""
        ...

    def list(self, prefix: str = "") -> Iterator[str]:
        """Keys under ``prefix`` (a plain string prefix, as S3 does), in lexicographic order."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; deleting a missing key is not an error."""
        ...
