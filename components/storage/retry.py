"""Riding out an S3 endpoint that is briefly down: time-budgeted retries with backoff, logged once per outage.

botocore retries a refused connection or a 5xx answer by itself, but only a few times: about 15 s in all
with the default settings, less when many threads fail at once and spend the client's shared retry quota.
A gateway restart, a load-balancer failover or a rolling upgrade of the servers lasts longer than that,
and a long curation ingest or training run should wait it out rather than fail, or, worse, record the
files it could not read as rejects. So every :class:`~components.storage.s3.S3ObjectStore` operation goes
through :func:`call_with_retries`: a transient failure (connection refused, reset or timed out, a 5xx or
throttling answer, a body cut off mid-read) is retried with capped exponential backoff and jitter until
the operation succeeds or the retry budget is spent (``DINOFLOW_S3_RETRY_SECONDS``, default 120 s); then
:class:`~components.storage.base.StoreUnavailableError` says so. Failures that waiting cannot fix (a
missing object, access denied, bad credentials, TLS) are raised at once.

Each store has one :class:`OutageLog`: the first failure of an outage is a warning, the recovery another
(with how long it lasted and how many retries it took), a reminder every 30 s in between; the retries
themselves are logged at debug level, so eight threads waiting out one outage print a few lines, not
hundreds.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from components.storage.base import StoreUnavailableError

log = logging.getLogger(__name__)

RETRY_SECONDS_ENV = "DINOFLOW_S3_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0  # a gateway restart or failover; longer means the store is really down
REMINDER_SECONDS = 30.0  # how often a long outage is logged again
MESSAGE_LIMIT = 300

# Error codes S3 (and Ceph RGW, MinIO) answer when the server is overloaded or failing, not the request.
TRANSIENT_CODES = frozenset({
    "InternalError", "RequestLimitExceeded", "RequestTimeout", "RequestTimeoutException", "ServiceUnavailable",
    "SlowDown", "Throttling", "ThrottlingException", "TooManyRequestsException",
})

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long one store operation keeps retrying transient failures, and how it spaces the retries."""

    budget_seconds: float = DEFAULT_RETRY_SECONDS  # 0: no retries beyond botocore's own
    first_delay_seconds: float = 0.5
    max_delay_seconds: float = 8.0  # a recovered server is noticed within this

    def __post_init__(self) -> None:
        delays_ok = 0 < self.first_delay_seconds <= self.max_delay_seconds
        if self.budget_seconds < 0 or not delays_ok:
            raise ValueError(f"invalid retry policy {self}: need budget >= 0 and 0 < first delay <= max delay")

    @classmethod
    def from_environment(cls) -> RetryPolicy:
        """The default policy, with the budget from ``DINOFLOW_S3_RETRY_SECONDS`` when that is set."""
        text = os.environ.get(RETRY_SECONDS_ENV, "").strip()
        if not text:
            return cls()
        try:
            return cls(budget_seconds=float(text))
        except ValueError as exc:
            raise ValueError(f"{RETRY_SECONDS_ENV} must be a number of seconds >= 0, got {text!r}") from exc

    def delay(self, retry: int, draw: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry ``retry`` (0-based): doubling up to the cap, half of it random so
        that threads which failed together do not all come back at the same instant."""
        ceiling = min(self.max_delay_seconds, self.first_delay_seconds * 2.0 ** min(retry, 32))
        return ceiling / 2 + draw() * ceiling / 2


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:MESSAGE_LIMIT]


def _client_error_is_transient(exc: BaseException) -> bool:
    response = getattr(exc, "response", None) or {}
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    code = str(response.get("Error", {}).get("Code", ""))
    return status >= 500 or status == 429 or code in TRANSIENT_CODES


def is_transient(exc: BaseException) -> bool:
    """Whether waiting and trying again can make the failed S3 call succeed."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError, SSLError
    from botocore.exceptions import ConnectionError as EndpointUnreachable
    from s3transfer.exceptions import RetriesExceededError

    if isinstance(exc, SSLError):  # a certificate or TLS setting: the same answer every time
        return False
    # Refused, reset, timed out, closed early, or a body that stopped mid-stream.
    if isinstance(exc, EndpointUnreachable | HTTPClientError | IncompleteReadError):
        return True
    if isinstance(exc, RetriesExceededError):  # s3transfer's own download retries ran out on a stream error
        return True
    if isinstance(exc, ClientError):
        return _client_error_is_transient(exc)
    if isinstance(exc, S3UploadFailedError):  # boto3 wraps the ClientError of a managed upload, unchained
        cause = exc.__cause__ or exc.__context__
        return cause is not None and is_transient(cause)
    return False


class OutageLog:
    """Tells the operator when operations on ``target`` start failing and when they work again.

    Shared by every thread using one store: an outage is one warning when it begins, a reminder every
    REMINDER_SECONDS, and one when an operation succeeds again."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._lock = threading.Lock()
        self._since: float | None = None
        self._reminded_at = 0.0
        self._retries = 0

    def failed(self, operation: str, exc: BaseException, budget_left: float) -> None:
        now = time.monotonic()
        with self._lock:
            began = self._since is None
            if began:
                self._since = self._reminded_at = now
            since = self._since if self._since is not None else now
            remind = not began and now - self._reminded_at >= REMINDER_SECONDS
            if remind:
                self._reminded_at = now
            self._retries += 1
        if began:
            log.warning("%s unreachable or failing: %s failed (%s); retrying with backoff for up to %.0f s "
                        "more (the budget is set by %s)", self.target, operation, describe(exc), budget_left,
                        RETRY_SECONDS_ENV)
        elif remind:
            log.warning("%s still unreachable after %.0f s: %s (%s)", self.target, now - since, operation,
                        describe(exc))
        else:
            log.debug("%s: %s failed again (%s)", self.target, operation, describe(exc))

    def succeeded(self) -> None:
        if self._since is None:  # the common case, without taking the lock
            return
        with self._lock:
            since, retries = self._since, self._retries
            self._since, self._retries = None, 0
        if since is not None:
            log.warning("%s reachable again after %.1f s (%d retries)", self.target, time.monotonic() - since,
                        retries)


def call_with_retries(operation: str, attempt: Callable[[], T], policy: RetryPolicy, outage: OutageLog) -> T:
    """``attempt()``, retried on transient failures until it succeeds or ``policy.budget_seconds`` are spent.

    ``operation`` names the call in messages (``GET s3://bucket/key``). The attempt must be safe to repeat
    (S3 GET, PUT, HEAD, LIST and DELETE are); a failure that is not transient is raised as it is."""
    started = time.monotonic()
    deadline = started + policy.budget_seconds
    retry = 0
    while True:
        try:
            result = attempt()
        except Exception as exc:
            if not is_transient(exc):
                raise
            left = deadline - time.monotonic()
            if left <= 0:
                raise StoreUnavailableError(
                    f"{outage.target}: {operation} kept failing for {time.monotonic() - started:.0f} s "
                    f"(last error: {describe(exc)}). The endpoint is down or overloaded: try again later, or "
                    f"let operations wait longer with {RETRY_SECONDS_ENV}=SECONDS") from exc
            outage.failed(operation, exc, left)
            time.sleep(min(policy.delay(retry), left))
            retry += 1
            continue
        outage.succeeded()
        return result


__all__ = ["DEFAULT_RETRY_SECONDS", "RETRY_SECONDS_ENV", "OutageLog", "RetryPolicy", "call_with_retries",
           "is_transient"]
