"""Object store on S3 or any S3-compatible server (Ceph RGW, MinIO, ...) through boto3.

Credentials come from boto3's normal chain (environment, shared config, instance role) and are
never logged or shown in ``repr``. The endpoint comes from the argument, else ``AWS_ENDPOINT_URL``
(which boto3 also reads itself), else AWS. S3 publishes an object only when its PUT (or the
CompleteMultipartUpload of a multipart upload) succeeds, so writes are atomic by the protocol.

Every operation rides out a server that is briefly down or overloaded (components/storage/retry.py):
transient failures are retried for up to ``DINOFLOW_S3_RETRY_SECONDS`` (default 120 s), logged once per
outage, and then raised as :class:`StoreUnavailableError`. Each retry repeats a whole request (S3 GET,
PUT, HEAD, LIST and DELETE are idempotent; an upload is published only when it completes).
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from components.storage.base import ObjectNotFoundError, check_key, join_key
from components.storage.retry import OutageLog, RetryPolicy, call_with_retries

_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
# botocore's own attempts per request: quick retries of a blip; an outage is the store's retry loop's job.
_BOTOCORE_ATTEMPTS = 3
_CONNECT_TIMEOUT_SECONDS = 10  # botocore's 60 s would let one hung connection eat half the retry budget

T = TypeVar("T")


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
        retry: RetryPolicy | None = None,
    ) -> None:
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._client = client if client is not None else _make_client(self.endpoint_url, region)
        self.retry = retry if retry is not None else RetryPolicy.from_environment()
        self._outage = OutageLog(f"S3 endpoint {self.endpoint_url or 'AWS'} (bucket {self.bucket})")
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:
        where = f", endpoint={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3ObjectStore({self.uri!r}{where})"

    @property
    def client(self) -> Any:
        """The boto3 S3 client (for its event hooks, or calls this class does not wrap: those get no retries)."""
        return self._client

    @property
    def uri(self) -> str:
        return f"s3://{join_key(self.bucket, self.prefix)}"

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _key(self, key: str) -> str:
        return join_key(self.prefix, check_key(key))

    def _retrying(self, operation: str, attempt: Callable[[], T]) -> T:
        return call_with_retries(operation, attempt, self.retry, self._outage)

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (needs the permission to do so)."""
        self._retrying(f"create bucket {self.bucket}", self._ensure_bucket_once)

    def _ensure_bucket_once(self) -> None:
        from botocore.exceptions import ClientError

        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_CODES | {"NoSuchBucket"}:
                raise
            try:
                self._client.create_bucket(Bucket=self.bucket)
            except ClientError as again:
                # A retry after a create whose answer was lost: the bucket is there, and ours.
                if _error_code(again) != "BucketAlreadyOwnedByYou":
                    raise

    def read(self, key: str) -> bytes:
        return self._retrying(f"GET {self.url_for(key)}", functools.partial(self._read_once, key))

    def _read_once(self, key: str) -> bytes:
        from botocore.exceptions import ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                raise ObjectNotFoundError(f"no object {key!r} in {self.uri}") from exc
            raise
        # Inside the retried call: a body cut off mid-read repeats the whole GET.
        body: bytes = response["Body"].read()
        return body

    def write(self, key: str, data: bytes) -> None:
        self._retrying(f"PUT {self.url_for(key)}", functools.partial(
            self._client.put_object, Bucket=self.bucket, Key=self._key(key), Body=data))

    def upload_file(self, key: str, path: Path) -> None:
        # Managed transfer: multipart above 8 MiB; the object appears only on completion, so a failed
        # attempt leaves nothing behind and the retry uploads the whole file again.
        self._retrying(f"PUT {self.url_for(key)}", functools.partial(
            self._client.upload_file, str(path), self.bucket, self._key(key)))

    def download_file(self, key: str, path: Path) -> None:
        from botocore.exceptions import ClientError

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        try:
            self._retrying(f"GET {self.url_for(key)}", functools.partial(
                self._client.download_file, self.bucket, self._key(key), temp_name))
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
        # Page by page with the continuation token, each page retried on its own: an outage in the
        # middle of a long listing resumes where it stopped instead of starting over.
        token: str | None = None
        while True:
            page = self._retrying(f"LIST s3://{self.bucket}/{full_prefix}",
                                  functools.partial(self._list_page, full_prefix, token))
            for item in page.get("Contents", []):
                yield item["Key"][strip:]
            token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
            if not token:
                return

    def _list_page(self, full_prefix: str, token: str | None) -> dict[str, Any]:
        arguments = {"Bucket": self.bucket, "Prefix": full_prefix}
        if token:
            arguments["ContinuationToken"] = token
        page: dict[str, Any] = self._client.list_objects_v2(**arguments)
        return page

    def exists(self, key: str) -> bool:
        return self._retrying(f"HEAD {self.url_for(key)}", functools.partial(self._exists_once, key))

    def _exists_once(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return False
            raise
        return True

    def delete(self, key: str) -> None:
        self._retrying(f"DELETE {self.url_for(key)}", functools.partial(
            self._client.delete_object, Bucket=self.bucket, Key=self._key(key)))


def _make_client(endpoint_url: str | None, region: str | None) -> Any:
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(region_name=region or os.environ.get("AWS_DEFAULT_REGION") or None)
    # Path-style addressing works with every S3-compatible server on loopback (no DNS per bucket).
    config = Config(retries={"total_max_attempts": _BOTOCORE_ATTEMPTS, "mode": "standard"},
                    connect_timeout=_CONNECT_TIMEOUT_SECONDS, s3={"addressing_style": "path"})
    return session.client("s3", endpoint_url=endpoint_url, config=config)


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", {}) or {}
    return str(response.get("Error", {}).get("Code", ""))
