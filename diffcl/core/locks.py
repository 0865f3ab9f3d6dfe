"""Advisory file locks (``fcntl.flock``) for what two processes must not do at once: train into one
run folder, or read-modify-write one registry file.

The lock lives in its own file (``<target>.lock`` or ``<run>/.lock``) because targets are replaced
by atomic renames, which would leave a lock on the old inode. The holder writes its pid into the
lock file so that the one refused can say who holds it. The kernel drops a flock when its process
dies, so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path


class LockBusy(RuntimeError):
    """The lock is held by another process (``pid``, when it could be read)."""

    def __init__(self, path: Path, pid: int | None):
        self.path, self.pid = path, pid
        super().__init__(f"{path} is locked by another process ({self.holder})")

    @property
    def holder(self) -> str:
        """``pid N`` or ``pid unknown``: the one way every message names the holder."""
        return f"pid {self.pid if self.pid is not None else 'unknown'}"


def _holder_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def exclusive_lock(path: str | Path, timeout_s: float = 0.0, poll_s: float = 0.05) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed). ``timeout_s=0``: fail at once with
    :class:`LockBusy` when another process holds it; otherwise wait up to that long."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockBusy(path, _holder_pid(path)) from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # no pid left behind for the next reader to blame
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
