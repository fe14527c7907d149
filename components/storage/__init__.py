"""Object stores: one small interface, a local-folder backend and an S3 backend.

``StoreLocator`` (locations.py) writes objects of the configured store as keys in tables and resolves
them back when read, so the tables are the same in every checkout.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from components.storage.base import (
    InvalidKeyError,
    ObjectNotFoundError,
    ObjectStore,
    StoreUnavailableError,
    check_key,
    join_key,
)
from components.storage.local import LocalObjectStore
from components.storage.locations import StoreLocator, is_store_key
from components.storage.retry import RetryPolicy
from components.storage.s3 import S3ObjectStore, parse_s3_uri


def file_uri_to_path(uri: str) -> Path:
    """``file:///a%20b/c`` -> ``Path('/a b/c')`` (the inverse of ``Path.as_uri``)."""
    return Path(unquote(urlparse(uri).path))


def open_store(
    uri: str | Path,
    endpoint_url: str | None = None,
    region: str | None = None,
    create_bucket: bool = False,
) -> ObjectStore:
    """Open the store at ``uri``: ``s3://bucket/prefix``, ``file:///path`` or a plain local path."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3ObjectStore(text, endpoint_url=endpoint_url, region=region, create_bucket=create_bucket)
    if text.startswith("file://"):
        text = str(file_uri_to_path(text))
    elif "://" in text:
        raise ValueError(f"unsupported object store URI {text!r}: use s3://, file:// or a local path")
    return LocalObjectStore(text)


def read_uri(uri: str, endpoint_url: str | None = None) -> bytes:
    """Read one object given its full URI (``s3://bucket/key`` or ``file:///path``)."""
    if uri.startswith("s3://"):
        bucket, key = parse_s3_uri(uri)
        return S3ObjectStore(f"s3://{bucket}", endpoint_url=endpoint_url).read(key)
    path = file_uri_to_path(uri) if uri.startswith("file://") else Path(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise ObjectNotFoundError(f"no object at {uri}") from exc


__all__ = [
    "InvalidKeyError",
    "LocalObjectStore",
    "ObjectNotFoundError",
    "ObjectStore",
    "RetryPolicy",
    "S3ObjectStore",
    "StoreLocator",
    "StoreUnavailableError",
    "check_key",
    "file_uri_to_path",
    "is_store_key",
    "join_key",
    "open_store",
    "parse_s3_uri",
    "read_uri",
]
