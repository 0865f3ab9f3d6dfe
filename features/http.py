"""HTTP for every download (source dumps, item images): one client set-up and one retry policy.

Transient failures, which a later attempt may fix, are retried: connection errors, timeouts, bodies
cut short, 408, 429 and 5xx (but 501 and 505, which will not change). A ``Retry-After`` header is
honoured, up to the cap on one delay. Every other answer >= 400 fails at once. Only requests are
retried here; an orchestrator that retries the whole stage after :class:`FetchError` with
``transient`` set multiplies the attempts (see ``attempts``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import TypeVar

import httpx

log = logging.getLogger(__name__)

USER_AGENT = "diffcl"
TRANSIENT_STATUS = frozenset({408, 429, *range(500, 600)}) - {501, 505}

T = TypeVar("T")


class FetchError(RuntimeError):
    """A download that cannot succeed (or did not within its retries); the message names the URL.
    ``transient``: the server or the network failed (connection, timeout, 5xx, 408, 429), so a
    later attempt may succeed; False for answers that will not change (404, 403, ...).
    ``reason``: the same without the URL, for callers that record it beside the URL."""

    def __init__(self, message: str, transient: bool = False, reason: str | None = None):
        super().__init__(message)
        self.transient = transient
        self.reason = reason or message


class Retry(Exception):
    """Raised by a response handler: this attempt failed in a way a later one may fix (a cut body)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is retried: ``retries`` further attempts, the n-th
    after ``backoff_s * 2**(n-1)`` seconds (or the server's ``Retry-After``), each at most
    ``max_backoff_s``; so one request waits at most ``retries * max_backoff_s`` in all."""

    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    @property
    def attempts(self) -> int:
        return self.retries + 1

    def delay(self, retry: int, retry_after: float | None = None) -> float:
        """Seconds before retry number ``retry`` (1 = the second attempt)."""
        backoff = self.backoff_s * 2 ** (retry - 1)
        return min(self.max_backoff_s, max(backoff, retry_after or 0.0))


def new_client(timeout_s: float, max_connections: int | None = None) -> httpx.Client:
    """The client every download uses: one timeout per connect/read/write, redirects followed,
    our user agent; ``max_connections`` bounds a pool shared by concurrent downloads."""
    limits = httpx.Limits(max_connections=max_connections) if max_connections else httpx.Limits()
    return httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=True,
                        headers={"User-Agent": USER_AGENT}, limits=limits)


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):
        return None


def _describe(err: httpx.TransportError) -> str:
    if isinstance(err, httpx.TimeoutException):
        return f"timeout ({type(err).__name__}: {err})"
    return f"{type(err).__name__}: {err}"


def get(client: httpx.Client, url: str, handle: Callable[[httpx.Response], T], policy: RetryPolicy,
        headers: Mapping[str, str] | Callable[[], Mapping[str, str]] | None = None) -> T:
    """GET ``url`` under ``policy``; ``handle`` reads the streamed response (status < 400) and
    returns the result, or raises :class:`Retry`. ``headers`` may be a function, called before
    each attempt: a resumed download asks for the bytes it still lacks. Raises :class:`FetchError`."""
    last, retry_after = "", None
    for attempt in range(policy.attempts):
        if attempt:
            delay = policy.delay(attempt, retry_after)
            log.warning("retrying %s in %.1fs (attempt %d of %d): %s", url, delay, attempt + 1, policy.attempts, last)
            time.sleep(delay)
        retry_after = None
        try:
            with client.stream("GET", url, headers=headers() if callable(headers) else headers) as response:
                status = response.status_code
                if status in TRANSIENT_STATUS:
                    last = f"HTTP {status} {response.reason_phrase}"
                    retry_after = retry_after_s(response.headers.get("Retry-After"))
                    continue
                if status >= 400:
                    raise FetchError(f"could not fetch {url}: HTTP {status} {response.reason_phrase}",
                                     reason=f"HTTP {status}")
                return handle(response)
        except Retry as err:
            last = str(err)
        except httpx.TransportError as err:  # connection refused / reset, timeouts, cut bodies
            last = _describe(err)
    failed = f"after {policy.attempts} attempts: {last}"
    raise FetchError(f"could not fetch {url} {failed}", transient=True, reason=f"failed {failed}")
