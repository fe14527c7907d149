"""Object store on a local folder: atomic writes by write-to-temp then rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

from components.storage.base import ObjectNotFoundError, check_key

# Temporary files live in a hidden folder of the same filesystem so os.replace is atomic and a
# listing never shows a half-written object.
TEMP_DIR_NAME = ".tmp"


class LocalObjectStore:
    """Objects as files under ``root``. ``durable=True`` also fsyncs each object before publishing."""

    def __init__(self, root: str | Path, durable: bool = False) -> None:
        self.root = Path(root).expanduser().resolve()
        self.durable = durable
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"LocalObjectStore({str(self.root)!r})"

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def url_for(self, key: str) -> str:
        return self._path(key).as_uri()

    def _path(self, key: str) -> Path:
        check_key(key)
        if key.split("/", 1)[0] == TEMP_DIR_NAME:
            raise ObjectNotFoundError(f"{key!r} is inside the store's temporary folder")
        return self.root / key

    def read(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFoundError(f"no object {key!r} in {self.uri}") from exc

    def _temp_path(self) -> Path:
        temp_dir = self.root / TEMP_DIR_NAME
        temp_dir.mkdir(exist_ok=True)
        return temp_dir / f"{uuid.uuid4().hex}.part"

    def _publish(self, temp: Path, key: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
        if self.durable:
            fsync_dir(target.parent)

    def write(self, key: str, data: bytes) -> None:
        self._path(key)  # validate before touching the disk
        temp = self._temp_path()
        try:
            with open(temp, "wb") as handle:
                handle.write(data)
                if self.durable:
                    handle.flush()
                    os.fsync(handle.fileno())
            self._publish(temp, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def upload_file(self, key: str, path: Path) -> None:
        self._path(key)
        temp = self._temp_path()
        try:
            shutil.copyfile(path, temp)
            if self.durable:
                with open(temp, "rb+") as handle:
                    os.fsync(handle.fileno())
            self._publish(temp, key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def download_file(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise ObjectNotFoundError(f"no object {key!r} in {self.uri}")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            shutil.copyfile(source, temp_name)
            os.replace(temp_name, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)

    def list(self, prefix: str = "") -> Iterator[str]:
        # Walk only the folder that can hold matches: the prefix up to its last '/'.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root / folder if folder else self.root
        if not start.is_dir():
            return iter(())
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = Path(dirpath).relative_to(self.root).as_posix()
            if rel_dir == ".":
                rel_dir = ""
                dirnames[:] = [d for d in dirnames if d != TEMP_DIR_NAME]
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    keys.append(key)
        return iter(sorted(keys))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


def fsync_dir(folder: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
