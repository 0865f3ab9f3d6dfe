"""The one retry policy every download uses (features.http), against the local test server."""

import time
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from features.http import FetchError, RetryPolicy, get, new_client, retry_after_s
from tests.httpserver import Route

FAST = RetryPolicy(retries=3, backoff_s=0.01, max_backoff_s=0.05)


def _get(url: str, policy: RetryPolicy = FAST) -> bytes:
    with new_client(timeout_s=5) as client:
        return get(client, url, lambda response: response.read(), policy)


def test_503_then_200_succeeds(http_server):
    http_server.routes["/flaky"] = Route(b"body", fail_first=1)
    assert _get(http_server.url("/flaky")) == b"body"
    assert http_server.hits["/flaky"] == 2


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504, 520])
def test_transient_statuses_are_retried(http_server, status):
    http_server.routes["/r"] = Route(b"body", fail_first=1, fail_status=status)
    assert _get(http_server.url("/r")) == b"body"


@pytest.mark.parametrize("status", [404, 403, 501])
def test_permanent_statuses_fail_at_once(http_server, status):
    http_server.routes["/p"] = Route(b"body", fail_first=10, fail_status=status)
    url = http_server.url("/p")
    with pytest.raises(FetchError, match=f"could not fetch {url}: HTTP {status}") as err:
        _get(url)
    assert not err.value.transient and err.value.reason == f"HTTP {status}"
    assert http_server.hits["/p"] == 1


def test_attempts_are_bounded(http_server):
    http_server.routes["/down"] = Route(b"body", fail_first=100)
    with pytest.raises(FetchError, match="after 4 attempts: HTTP 503 Service Unavailable") as err:
        _get(http_server.url("/down"))
    assert err.value.transient and http_server.hits["/down"] == FAST.attempts == 4


def test_connection_errors_are_transient_and_bounded():
    with pytest.raises(FetchError, match="after 4 attempts: ConnectError") as err:
        _get("http://127.0.0.1:9/")  # discard port: nothing listens
    assert err.value.transient


def test_retry_after_is_honoured_up_to_the_cap(http_server):
    http_server.routes["/busy"] = Route(b"body", fail_first=1, fail_status=429, retry_after="1")
    started = time.monotonic()
    assert _get(http_server.url("/busy"), RetryPolicy(1, backoff_s=0.01, max_backoff_s=5)) == b"body"
    assert time.monotonic() - started >= 1.0  # the server's delay, not the 0.01 s backoff

    http_server.routes["/busy2"] = Route(b"body", fail_first=1, fail_status=503, retry_after="30")
    started = time.monotonic()
    assert _get(http_server.url("/busy2"), RetryPolicy(1, backoff_s=0.01, max_backoff_s=0.2)) == b"body"
    assert 0.2 <= time.monotonic() - started < 5  # capped: 30 s asked, 0.2 s waited


def test_backoff_doubles_and_is_capped():
    policy = RetryPolicy(retries=6, backoff_s=1.0, max_backoff_s=10.0)
    assert [policy.delay(n) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.delay(1, retry_after=3) == 3 and policy.delay(4, retry_after=3) == 8
    assert policy.delay(1, retry_after=3600) == 10


def test_retry_after_forms():
    assert retry_after_s("7") == 7 and retry_after_s(None) is None and retry_after_s("soon") is None
    later = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=60), usegmt=True)
    assert 55 <= retry_after_s(later) <= 60
    assert retry_after_s("Wed, 01 Jan 2020 00:00:00 GMT") == 0


def test_image_downloads_share_the_policy(http_server, tmp_path):
    from features.image_download import DownloadSettings, fetch_images

    http_server.routes["/flaky.png"] = Route(b"x", fail_first=1)
    http_server.routes["/down.png"] = Route(b"x", fail_first=100)
    settings = DownloadSettings(timeout_s=5, retries=2, backoff_s=0.01)
    flaky, down = fetch_images([http_server.url("/flaky.png"), http_server.url("/down.png")], tmp_path,
                               settings, progress=False)
    assert http_server.hits["/flaky.png"] == 2 and flaky.reason.startswith("undecodable image")  # got the body
    assert down.reason == "failed after 3 attempts: HTTP 503 Service Unavailable"
    assert http_server.hits["/down.png"] == settings.policy.attempts == 3
