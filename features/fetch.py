"""Download a source file robustly and remember what was fetched.

- retries transient failures under :class:`features.http.RetryPolicy` (network errors, 5xx, 408,
  429 with ``Retry-After``); other 4xx fail at once with a message naming the URL;
- an interrupted transfer resumes from the partial file (``Range`` with ``If-Range``) when the
  server supports it, and restarts cleanly when it does not;
- the file appears under its final name only once complete (``.part`` file, then rename);
- a manifest beside it (URL, size, sha256, ETag, Last-Modified, fetch time) lets a later run ask
  the server whether the file changed (``If-None-Match`` / ``If-Modified-Since``) and skip the
  download on ``304 Not Modified``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from diffcl.core.io import sha256_file, write_json_atomic
from features.http import FetchError, Retry, RetryPolicy, get, new_client

__all__ = ["FetchError", "FetchResult", "Manifest", "fetch", "local_manifest", "manifest_path", "verified_copy"]

log = logging.getLogger(__name__)

CHUNK = 1 << 16


@dataclass
class Manifest:
    url: str
    size: int
    sha256: str
    etag: str | None
    last_modified: str | None
    fetched_at: str
    checked_at: str

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None

    def write(self, path: Path) -> None:
        write_json_atomic(path, asdict(self))


@dataclass
class FetchResult:
    path: Path
    manifest: Manifest
    downloaded: bool  # False: the local copy was current (304, or check_remote off)


def manifest_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".manifest.json")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )


def fetch(
    url: str,
    dest: str | Path,
    *,
    timeout_s: float = 60.0,
    retries: int = 5,
    backoff_s: float = 1.0,
    max_backoff_s: float = 60.0,
    check_remote: bool = True,
    progress: bool = True,
    client: httpx.Client | None = None,
) -> FetchResult:
    """Fetch ``url`` into the file ``dest`` (see the module docstring for the guarantees); the
    retry settings are ``fetch.*`` of the config. Raises :class:`FetchError`."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    own_client = client is None
    client = client or new_client(timeout_s)
    try:
        return _fetch(url, dest, client, RetryPolicy(retries, backoff_s, max_backoff_s), check_remote, progress)
    finally:
        if own_client:
            client.close()


def _fetch(url: str, dest: Path, client: httpx.Client, policy: RetryPolicy, check_remote: bool,
           progress: bool) -> FetchResult:
    mpath = manifest_path(dest)
    old = Manifest.read(mpath)
    have_current = (
        old is not None and old.url == url and dest.exists() and dest.stat().st_size == old.size
    )
    if have_current and not check_remote:
        return FetchResult(dest, old, downloaded=False)
    current = old if have_current else None
    part = dest.with_name(dest.name + ".part")
    part_meta = dest.with_name(dest.name + ".part.json")

    def part_size() -> int:
        return part.stat().st_size if part.exists() else 0

    def headers() -> dict[str, str]:
        """Asked again before each attempt: the .part file may have grown since the last one."""
        headers: dict[str, str] = {}
        if current is not None:
            if current.etag:
                headers["If-None-Match"] = current.etag
            if current.last_modified:
                headers["If-Modified-Since"] = current.last_modified
        offset = part_size()
        validator = _read_validator(part_meta) if offset else None
        if offset and validator:
            # If-Range: the server sends the rest only if the file is still the one we began with.
            headers["Range"] = f"bytes={offset}-"
            headers["If-Range"] = validator
        return headers

    def receive(response: httpx.Response) -> FetchResult:
        if response.status_code == 304 and current is not None:
            current.checked_at = _now()
            current.write(mpath)
            log.info("%s unchanged on the server; keeping %s", url, dest)
            return FetchResult(dest, current, downloaded=False)
        offset = part_size()
        if response.status_code == 206 and _range_start(response) == offset:
            mode = "ab"
        else:  # 200: the whole file (no range support, or the file changed under us)
            offset, mode = 0, "wb"
        etag = response.headers.get("ETag")
        last_modified = response.headers.get("Last-Modified")
        if etag or last_modified:
            part_meta.write_text(json.dumps({"url": url, "validator": etag or last_modified}))
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        written = offset
        with _progress(progress) as bar, open(part, mode) as out:
            task = bar.add_task(dest.name, total=total, completed=offset)
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
                written += len(chunk)
                bar.update(task, completed=written)
        if total is not None and written != total:
            raise Retry(f"transfer ended at {written} of {total} bytes")
        return _finish(url, dest, part, part_meta, etag, last_modified)

    return get(client, url, receive, policy, headers=headers)


def _finish(url: str, dest: Path, part: Path, part_meta: Path, etag: str | None,
            last_modified: str | None) -> FetchResult:
    """Only a complete file takes its final name, and its manifest with it."""
    part.replace(dest)
    part_meta.unlink(missing_ok=True)
    manifest = _manifest_of(dest, url, etag, last_modified)
    manifest.write(manifest_path(dest))
    log.info("fetched %s (%d bytes)", url, manifest.size)
    return FetchResult(dest, manifest, downloaded=True)


def verified_copy(url: str, dest: str | Path) -> Manifest | None:
    """The manifest of the copy of ``url`` in ``dest`` when the file still matches it (size and
    sha256): what a run may fall back on while the server is unreachable."""
    dest = Path(dest)
    manifest = Manifest.read(manifest_path(dest))
    if manifest is None or manifest.url != url or not dest.is_file() or dest.stat().st_size != manifest.size:
        return None
    return manifest if sha256_file(dest) == manifest.sha256 else None


def _read_validator(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["validator"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def _range_start(response: httpx.Response) -> int | None:
    # "Content-Range: bytes 100-199/200"
    value = response.headers.get("Content-Range", "")
    try:
        return int(value.split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def local_manifest(path: Path, url: str | None = None) -> Manifest:
    """A manifest for a file read in place (local path or file:// URL): size and content hash."""
    modified = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return _manifest_of(path, url or str(path), None, modified)


def _manifest_of(path: Path, url: str, etag: str | None, last_modified: str | None) -> Manifest:
    """The manifest of the complete file at ``path``: its size and sha256, fetched and checked now."""
    now = _now()
    return Manifest(url=url, size=path.stat().st_size, sha256=sha256_file(path), etag=etag,
                    last_modified=last_modified, fetched_at=now, checked_at=now)
