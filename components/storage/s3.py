"""Object store on S3 or any S3-compatible server (Ceph RGW, MinIO, ...) through boto3.

Credentials come from boto3's normal chain (environment, shared config, instance role) and are
never logged or shown in ``repr``. The endpoint comes from the argument, else ``AWS_ENDPOINT_URL``
(which boto3 also reads itself), else AWS. S3 publishes an object only when its PUT (or the
CompleteMultipartUpload of a multipart upload) succeeds, so writes are atomic by the protocol.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from components.storage.base import ObjectNotFoundError, check_key, join_key

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> (``bucket``, ``some/prefix``)."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, prefix = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI has no bucket: {uri!r}")
    return bucket, prefix.strip("/")


class S3ObjectStore:
    """Objects under ``s3://bucket/prefix``."""

    def __init__(
        self,
        uri: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        client: Any | None = None,
        create_bucket: bool = False,
    ) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._client = client if client is not None else _make_client(self.endpoint_url, region)
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:
        where = f", endpoint={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3ObjectStore({self.uri!r}{where})"

    @property
    def uri(self) -> str:
        return f"s3://{join_key(self.bucket, self.prefix)}"

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _key(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (needs the permission to do so)."""
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_CODES | {"NoSuchBucket"}:
                raise
            self._client.create_bucket(Bucket=self.bucket)

    def read(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise ObjectNotFoundError(f"no object {key!r} in {self.uri}") from exc
            raise
        body: bytes = response["Body"].read()
        return body

    def write(self, key: str, data: bytes) -> None:
        self._client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)

    def upload_file(self, key: str, path: Path) -> None:
        # Managed transfer: multipart above 8 MiB; the object appears only on completion.
        self._client.upload_file(str(path), self.bucket, self._key(key))

    def download_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            self._client.download_file(self.bucket, self._key(key), temp_name)
            os.replace(temp_name, path)
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise ObjectNotFoundError(f"no object {key!r} in {self.uri}") from exc
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp_name)

    def list(self, prefix: str = "") -> Iterator[str]:
        full_prefix = join_key(self.prefix, prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        if prefix.endswith("/") and not full_prefix.endswith("/"):
            full_prefix += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
            for item in page.get("Contents", []):
                yield item["Key"][strip:]

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self._client.delete_object(Bucket=self.bucket, Key=self._key(key))


def _make_client(endpoint_url: str | None, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(region_name=region or os.environ.get("AWS_DEFAULT_REGION") or None)
    # Path-style addressing works with every S3-compatible server on loopback (no DNS per bucket).
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, s3={"addressing_style": "path"})
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", {}) or {}
    return str(response.get("Error", {}).get("Code", ""))
