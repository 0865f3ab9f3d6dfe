"""A workspace shared by machines: an fsspec URL (``s3://bucket/prefix``, ``gs://``, ``memory://``,
``file://``) that is the system of record, and on each machine a local copy of it.

Every stage keeps running on local files (``workspace``: atomic renames, flocks, memory maps all
need a local disk); the flow's tasks bring a stage's inputs down from the shared workspace before it
runs (:meth:`SharedWorkspace.pull`) and send its outputs up after (:meth:`SharedWorkspace.push`), so a
task can run on any machine that reaches the URL. What moves:

- pull takes a file when the shared copy changed since this machine last synced it (its listing
  stamp: size plus the store's version, ETag or modification time);
- push sends a file when the local copy changed since the last sync (size, mtime), so an untouched
  local file never goes over a newer shared one (nor back where another machine deleted it); a file
  this machine synced and then deleted (a merged shard part) is deleted from the shared workspace too;
- a path may be a glob (``features/*.parquet``, ``runs/mf-1a2b*``); a folder it matches counts with
  every file inside;
- an upload goes to a temporary name and is then moved onto its key, so nobody reads half an
  object; a download is renamed into place the same way (:func:`diffcl.core.io.atomic_path`).

An object store has no flock: one flow run per shared workspace is held by a lease object
(:meth:`SharedWorkspace.lease`), created with an exclusive create (``mode="xb"``: S3's
``If-None-Match``, GCS's generation 0, O_EXCL on local disks), renewed while held, broken by a waiter
only once expired (or, for an empty one, unreadable for a whole ttl). Breaking an expired lease is
not atomic: the lease is read again just before it is deleted, but a waiter may still delete a lease
another waiter took in between (fsspec offers no compare-and-delete).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffcl.core.io import atomic_path, write_json_atomic
from diffcl.core.locks import LockBusy, exclusive_lock

log = logging.getLogger(__name__)

# Listing fields that change when an object's content does, across stores (local mtime, memory's
# created, S3's ETag / LastModified, GCS's generation / md5Hash).
_VERSION_FIELDS = ("size", "mtime", "created", "ETag", "etag", "LastModified", "generation", "md5Hash")
# Never shared: this machine's locks and partial files.
_LOCAL_ONLY_SUFFIXES = (".lock", ".tmp", ".part")
SYNC_STATE = ".shared-sync.json"  # in the local copy: what this machine last synced, per file
MIRROR_ROOT = Path("/var/tmp/diffcl-workspaces")


def default_mirror(url: str) -> Path:
    """The local copy of a shared workspace given only by its URL: one folder per URL, at the same
    path on every machine (task results name files by their path). The URL is the record, but the
    copy is not a throwaway cache: a file deleted in it is deleted from the URL by the next push."""
    return MIRROR_ROOT / hashlib.sha256(url.encode()).hexdigest()[:16]


def _stamp(info: dict[str, Any]) -> str:
    return json.dumps({k: str(info[k]) for k in _VERSION_FIELDS if k in info}, sort_keys=True)


def _local_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _shared_name(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return not name.endswith(_LOCAL_ONLY_SUFFIXES) and rel.split("/", 1)[0] != SYNC_STATE


class LeaseBusy(LockBusy):
    """The shared workspace's lease is held by a live holder (``host pid N``)."""

    def __init__(self, url: str, holder: str):
        self.url, self._holder = url, holder
        super().__init__(url, None)

    @property
    def holder(self) -> str:
        return self._holder


class SharedWorkspace:
    """The shared workspace at ``url`` and this machine's copy of it at ``local``. Paths are
    relative to both roots (``scientific/prepared/items.parquet``)."""

    def __init__(self, url: str, local: str | Path):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.local = Path(local)

    # ------------------------------------------------------------------------------ sync state
    def _remote(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _rel_of_remote(self, path: str) -> str:
        return path[len(self.root):].lstrip("/")

    def _read_state(self) -> dict[str, Any]:
        """Per file, what this machine last synced with this URL (a local copy once synced with
        another URL starts afresh)."""
        try:
            state = json.loads((self.local / SYNC_STATE).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return state.get("files", {}) if state.get("url") == self.url else {}

    def _record(self, synced: dict[str, dict[str, Any]], deleted: list[str] = ()) -> None:
        """Merge what one pull or push synced (or deleted) into the state (threads and processes
        of this machine may sync other files at the same time)."""
        if not synced and not deleted:
            return
        path = self.local / SYNC_STATE
        # The flock serialises threads too: each call opens the lock file anew.
        with exclusive_lock(path.with_suffix(".lock"), timeout_s=60):
            files = self._read_state()
            files.update(synced)
            for file_rel in deleted:
                files.pop(file_rel, None)
            write_json_atomic(path, {"url": self.url, "files": files})

    # ------------------------------------------------------------------------------- transfers
    def _listing(self, rel: str) -> dict[str, dict[str, Any]]:
        """The shared files at ``rel``: a file, every file under a folder, or a glob's matches."""
        remote = self._remote(rel)
        self.fs.invalidate_cache()  # s3fs and others cache listings: another machine's files would be missed
        if any(c in rel for c in "*?["):
            found = {}
            for path, info in self.fs.glob(remote, detail=True).items():  # a folder matched: its files
                found.update(self.fs.find(path, detail=True) if info.get("type") == "directory" else {path: info})
        elif self.fs.exists(remote):
            found = self.fs.find(remote, detail=True)
        else:
            return {}
        return {self._rel_of_remote(p): info for p, info in found.items() if info.get("type", "file") == "file"}

    def _local_files(self, rel: str) -> list[Path]:
        if any(c in rel for c in "*?["):
            matches = sorted(self.local.glob(rel))
        else:
            matches = [self.local / rel] if (self.local / rel).exists() else []
        files = []
        for match in matches:
            files.extend([match] if match.is_file() else sorted(p for p in match.rglob("*") if p.is_file()))
        return files

    def pull(self, *rels: str) -> int:
        """Bring files or folders (relative paths) down where the shared copy changed; returns how
        many files moved. A path missing from the shared workspace is left alone."""
        known, synced = self._read_state(), {}
        for rel in rels:
            for file_rel, info in sorted(self._listing(rel).items()):
                if not _shared_name(file_rel):
                    continue
                local = self.local / file_rel
                seen = known.get(file_rel, {})
                if local.exists() and seen.get("shared") == _stamp(info) and seen.get("local") == _local_stamp(local):
                    continue
                with atomic_path(local) as tmp:
                    self._download(self._remote(file_rel), tmp)
                synced[file_rel] = {"shared": _stamp(info), "local": _local_stamp(local)}
        self._record(synced)
        return len(synced)

    def _download(self, remote: str, local: Path) -> None:
        if "memory" in self.fs.protocol:
            # fsspec's in-memory store opens every reader on one shared buffer: two threads reading
            # the same file at once would each get pieces. Copy the bytes out instead.
            local.write_bytes(self.fs.cat_file(remote))
        else:
            self.fs.get_file(remote, str(local))

    def push(self, *rels: str) -> int:
        """Send local files or folders (relative paths) up where the local copy changed since the
        last sync, and delete the shared copies of files deleted here since; returns how many files
        moved or went. A local file untouched since the last sync never replaces a shared one."""
        known, synced, deleted = self._read_state(), {}, []
        for rel in rels:
            shared = self._listing(rel)  # one listing per path, not a request per file
            for file_rel, info in shared.items():
                seen = known.get(file_rel)
                if seen and not (self.local / file_rel).exists() and seen.get("shared") == _stamp(info):
                    self.fs.rm_file(self._remote(file_rel))  # deleted here after the last sync
                    deleted.append(file_rel)
            uploaded = []
            for path in self._local_files(rel):
                file_rel = path.relative_to(self.local).as_posix()
                # Untouched since the last sync: the shared copy is as new or newer, or was deleted
                # elsewhere on purpose (a merged part); either way not this file's to send.
                if not _shared_name(file_rel) or file_rel in synced or (
                        known.get(file_rel, {}).get("local") == _local_stamp(path)):
                    continue
                remote = self._remote(file_rel)
                parent, _, name = remote.rpartition("/")
                self.fs.makedirs(parent, exist_ok=True)
                partial = f"{parent}/.{name}.{secrets.token_hex(4)}.part"
                self.fs.put_file(str(path), partial)
                self.fs.mv(partial, remote)
                uploaded.append((file_rel, path))
            # The stamps as a listing shows them (info() and find() may format a field differently):
            # one listing for everything this path sent.
            listed = self._listing(rel) if uploaded else {}
            for file_rel, path in uploaded:
                synced[file_rel] = {"shared": _stamp(listed[file_rel]), "local": _local_stamp(path)}
        self._record(synced, deleted)
        return len(synced) + len(deleted)

    # ---------------------------------------------------------------------------------- lease
    @contextlib.contextmanager
    def lease(self, rel: str, timeout_s: float = 0.0, ttl_s: float = 300.0, poll_s: float = 1.0) -> Iterator[None]:
        """Hold the lease object ``rel`` (exclusive create); renewed every ttl/3 while held. A
        waiter takes over a lease whose holder let it expire (a crashed run); otherwise it waits
        up to ``timeout_s`` and raises :class:`LeaseBusy` naming the holder."""
        path = self._remote(rel)
        token = secrets.token_hex(8)
        holder = f"{socket.gethostname()} pid {os.getpid()}"

        def body() -> bytes:
            return json.dumps({"holder": holder, "token": token, "expires": time.time() + ttl_s}).encode()

        self.fs.makedirs(path.rpartition("/")[0], exist_ok=True)
        deadline = time.monotonic() + timeout_s
        unreadable_since: float | None = None
        while True:
            try:
                with self.fs.open(path, "xb") as handle:
                    handle.write(body())
                break
            except FileExistsError:
                current = self._read_lease(path)
                # An empty or torn lease (its holder died between create and write) counts as
                # expired once it stayed unreadable for a whole ttl.
                unreadable_since = (unreadable_since or time.monotonic()) if current is None else None
                expired = (current is not None and current.get("expires", 0) < time.time()) or (
                    unreadable_since is not None and time.monotonic() - unreadable_since > ttl_s)
                if expired and self._read_lease(path) == current:  # still the lease judged expired
                    with contextlib.suppress(FileNotFoundError):  # another waiter removed it first
                        self.fs.rm_file(path)
                    unreadable_since = None
                    continue
                if time.monotonic() >= deadline:
                    raise LeaseBusy(self.url, (current or {}).get("holder", "unknown holder")) from None
                time.sleep(poll_s)
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(ttl_s / 3):
                try:
                    if (self._read_lease(path) or {}).get("token") == token:
                        self.fs.pipe_file(path, body())
                except Exception as err:  # a store hiccup: the next renewal (ttl/3 later) retries
                    log.warning("renewing the lease %s failed (%s); retrying", path, err)

        renewer = threading.Thread(target=renew, name=f"lease {rel}", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join()
            if (self._read_lease(path) or {}).get("token") == token:
                self.fs.rm(path)

    def _read_lease(self, path: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except (FileNotFoundError, json.JSONDecodeError):
            return None


def shared_workspace(config: Any) -> SharedWorkspace | None:
    """The shared workspace of a config (a PipelineConfig or its JSON dump); None when local only."""
    if isinstance(config, dict):
        url, local = config.get("shared_workspace"), config["workspace"]
    else:
        url, local = config.shared_workspace, config.workspace
    return SharedWorkspace(url, local) if url else None
