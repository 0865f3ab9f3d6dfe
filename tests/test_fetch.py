import hashlib
import json

import pytest

from features.fetch import FetchError, Manifest, fetch, manifest_path
from tests.httpserver import Route

BODY = bytes(range(256)) * 4096  # 1 MiB


def _fetch(url, dest, **kw):
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("timeout_s", 5)
    kw.setdefault("progress", False)
    return fetch(url, dest, **kw)


def test_download_writes_file_and_manifest(http_server, tmp_path):
    http_server.routes["/data.json.gz"] = Route(BODY)
    result = _fetch(http_server.url("/data.json.gz"), tmp_path / "data.json.gz")
    assert result.downloaded
    assert (tmp_path / "data.json.gz").read_bytes() == BODY
    manifest = json.loads(manifest_path(tmp_path / "data.json.gz").read_text())
    assert manifest["sha256"] == hashlib.sha256(BODY).hexdigest()
    assert manifest["size"] == len(BODY)
    assert manifest["etag"] == http_server.routes["/data.json.gz"].etag
    assert manifest["last_modified"]
    assert not list(tmp_path.glob("*.part*"))


def test_server_failing_twice_then_answering(http_server, tmp_path):
    http_server.routes["/flaky"] = Route(BODY, fail_first=2)
    result = _fetch(http_server.url("/flaky"), tmp_path / "flaky", retries=3)
    assert result.path.read_bytes() == BODY
    assert http_server.hits["/flaky"] == 3


def test_gives_up_after_retries_and_names_url(http_server, tmp_path):
    http_server.routes["/down"] = Route(BODY, fail_first=10)
    url = http_server.url("/down")
    with pytest.raises(FetchError, match=r"after 3 attempts.*503") as err:
        _fetch(url, tmp_path / "down", retries=2)
    assert url in str(err.value)
    assert not (tmp_path / "down").exists()


def test_cut_connection_resumes_with_range(http_server, tmp_path):
    http_server.routes["/cut"] = Route(BODY, cut_first=1)
    result = _fetch(http_server.url("/cut"), tmp_path / "cut", retries=2)
    assert result.path.read_bytes() == BODY
    second = http_server.requests[-1][1]
    assert second.get("Range", "").startswith("bytes=") and second["Range"] != "bytes=0-"
    assert second.get("If-Range") == http_server.routes["/cut"].etag


def test_cut_connection_without_range_support_restarts(http_server, tmp_path):
    http_server.routes["/cut"] = Route(BODY, cut_first=1, ranges=False)
    result = _fetch(http_server.url("/cut"), tmp_path / "cut", retries=2)
    assert result.path.read_bytes() == BODY


def test_404_fails_at_once_naming_url(http_server, tmp_path):
    url = http_server.url("/missing.json.gz")
    with pytest.raises(FetchError, match="HTTP 404") as err:
        _fetch(url, tmp_path / "missing.json.gz", retries=5)
    assert url in str(err.value)
    assert http_server.hits["/missing.json.gz"] == 1  # a 404 is not retried
    assert not (tmp_path / "missing.json.gz").exists()


def test_unchanged_file_is_not_downloaded_again(http_server, tmp_path):
    http_server.routes["/d"] = Route(BODY)
    first = _fetch(http_server.url("/d"), tmp_path / "d")
    second = _fetch(http_server.url("/d"), tmp_path / "d")
    assert first.downloaded and not second.downloaded
    headers = http_server.requests[-1][1]
    assert headers.get("If-None-Match") == http_server.routes["/d"].etag
    assert second.manifest.sha256 == first.manifest.sha256


def test_changed_file_is_downloaded_again(http_server, tmp_path):
    http_server.routes["/d"] = Route(BODY)
    _fetch(http_server.url("/d"), tmp_path / "d")
    http_server.routes["/d"] = Route(BODY[::-1])
    result = _fetch(http_server.url("/d"), tmp_path / "d")
    assert result.downloaded and result.path.read_bytes() == BODY[::-1]


def test_check_remote_off_trusts_local_copy(http_server, tmp_path):
    http_server.routes["/d"] = Route(BODY)
    _fetch(http_server.url("/d"), tmp_path / "d")
    hits = http_server.hits["/d"]
    result = _fetch(http_server.url("/d"), tmp_path / "d", check_remote=False)
    assert not result.downloaded and http_server.hits["/d"] == hits


def test_partial_file_is_never_taken_for_finished(http_server, tmp_path):
    http_server.routes["/cut"] = Route(BODY, cut_first=5)
    with pytest.raises(FetchError):
        _fetch(http_server.url("/cut"), tmp_path / "cut", retries=0)
    assert not (tmp_path / "cut").exists()
    assert Manifest.read(manifest_path(tmp_path / "cut")) is None
