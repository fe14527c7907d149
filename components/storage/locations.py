"""Portable object references: a key in the configured store, or an absolute URI for anything else.

The tables the pipeline writes (the demo pool, the ingest and curation tables, the manifests) are DVC
outputs: they must be byte-identical in every checkout, or ``dvc.lock`` changes after each
``make demo``. An absolute URI of the default store (``file:///<checkout>/.dinoflow/store/...``) is
not, so an object of the configured store is written as its *key* in that store and resolved against
the configured store (``store.uri`` of params/project.yaml, or ``DINOFLOW_STORE_URI``) when read.

A reference ``ref`` is read as:

* a URI (``s3://...``, ``file://...``) or an absolute local path: used as is (objects outside the
  configured store, and tables written before references were portable);
* anything else: a key in the configured store (``pool/demo/photos/photo-coffee.png``).

Locations recorded only for people and fingerprints (a pool folder in a stats file, a backbone folder
in a step fingerprint) go through :meth:`StoreLocator.describe`: a key when inside the store, else
``./relative/path`` when inside the project, else unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from components.storage.base import ObjectStore, check_key


def is_store_key(ref: str) -> bool:
    """Whether ``ref`` is a key of the configured store (not a URI and not an absolute path)."""
    return "://" not in ref and not ref.startswith("/")


def _local_path(uri: str) -> Path | None:
    from components.storage import file_uri_to_path

    if uri.startswith("file://"):
        return file_uri_to_path(uri)
    if uri.startswith("/"):
        return Path(uri)
    return None


@dataclass(frozen=True)
class StoreLocator:
    """Turns URIs of objects in one store into keys and back; picklable (DataLoader workers get a copy).

    ``root`` is the store's root URI (``ObjectStore.uri``: ``file:///...`` or ``s3://bucket/prefix``);
    ``project``, optional, the project folder that :meth:`describe` writes other local paths relative to.
    """

    root: str
    endpoint_url: str | None = None
    project: str = ""

    @classmethod
    def for_store(cls, store: ObjectStore | StoreLocator, project: str | Path = "") -> StoreLocator:
        if isinstance(store, StoreLocator):
            return store
        return cls(root=store.uri, endpoint_url=getattr(store, "endpoint_url", None),
                   project=str(Path(project).resolve()) if project else "")

    @classmethod
    def for_uri(cls, uri: str | Path, endpoint_url: str | None = None) -> StoreLocator:
        """The locator of the store ``open_store(uri)`` would open, without opening (or creating) it."""
        text = str(uri)
        if text.startswith("s3://"):
            return cls(root=text.rstrip("/"), endpoint_url=endpoint_url)
        path = _local_path(text) or Path(text)
        return cls(root=path.expanduser().resolve().as_uri())

    @property
    def _local_root(self) -> Path | None:
        return _local_path(self.root) if self.root.startswith("file://") else None

    def portable(self, uri: str) -> str:
        """The key of ``uri`` when it names something inside this store ("" for the root); else ``uri``."""
        if not uri or is_store_key(uri):
            return uri
        local = self._local_root
        if local is not None:
            path = _local_path(uri)
            if path is None:
                return uri
            resolved = path.resolve()
            if resolved == local:
                return ""
            if resolved.is_relative_to(local):
                return resolved.relative_to(local).as_posix()
            return uri
        if uri == self.root:
            return ""
        if uri.startswith(self.root + "/"):
            return uri[len(self.root) + 1:]
        return uri

    def describe(self, location: str) -> str:
        """``location`` as recorded in stats, reports and fingerprints: without this checkout's path.

        Not for reading back: a key of the store, ``./path`` inside the project, else ``location``."""
        portable = self.portable(location)
        if portable != location or not self.project:
            return portable
        path = _local_path(location)
        if path is None:
            return location
        resolved, project = path.resolve(), Path(self.project)
        if resolved == project:
            return "."
        return f"./{resolved.relative_to(project).as_posix()}" if resolved.is_relative_to(project) else location

    def resolve(self, ref: str) -> str:
        """The full URI of ``ref``: a key joined to this store's root; a URI or absolute path unchanged."""
        if not is_store_key(ref):
            return ref
        if ref:
            check_key(ref)  # a key never leaves the store ("..", absolute parts)
        local = self._local_root
        if local is not None:
            return (local / ref).as_uri() if ref else local.as_uri()
        return f"{self.root}/{ref}" if ref else self.root

    def read(self, ref: str) -> bytes:
        """The bytes of the object ``ref`` names (a key of this store, or any URI ``read_uri`` reads)."""
        from components.storage import read_uri

        return read_uri(self.resolve(ref), endpoint_url=self.endpoint_url)


__all__ = ["StoreLocator", "is_store_key"]
