"""List the objects of a raw image pool as a stream of keys, never materialising the pool twice."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from components.storage import LocalObjectStore, ObjectStore

# Names that are in-flight or editor/OS leftovers, not pool content: a downloader's partial file
# (or LocalObjectStore's own temp objects) must never be ingested as a truncated image.
TEMP_SUFFIXES = (".part", ".partial", ".tmp", ".crdownload", "~")


def is_hidden_or_temp(key: str) -> bool:
    """Whether any segment of ``key`` is hidden (leading '.') or the file name looks temporary."""
    parts = key.split("/")
    return any(part.startswith(".") for part in parts) or parts[-1].lower().endswith(TEMP_SUFFIXES)


def walk_local(root: Path) -> Iterator[str]:
    """Keys of files under ``root`` in a deterministic order, pruning hidden folders as it goes.

    A generator over ``os.walk`` with sorted folder and file names, so only one folder's listing
    is in memory at a time (LocalObjectStore.list sorts the whole tree at once).
    """
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for name in sorted(filenames):
            key = name if rel_dir == "." else f"{rel_dir}/{name}"
            if not is_hidden_or_temp(key):
                yield key


def list_pool(store: ObjectStore) -> Iterator[str]:
    """Keys of every candidate object in the pool: a local walk, or the store's paginated listing."""
    if isinstance(store, LocalObjectStore):
        yield from walk_local(store.root)
        return
    for key in store.list():
        # S3 "folder" markers (keys ending in '/') are not objects with content.
        if key and not key.endswith("/") and not is_hidden_or_temp(key):
            yield key
