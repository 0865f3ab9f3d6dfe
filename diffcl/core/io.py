"""Small file helpers shared by every stage: atomic writes, content hashes, URL tests.

Every output is written to a temporary file beside its target and renamed into place, so a crash
or an interrupted run never leaves a file that a later run would take for finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

URL_SCHEMES = ("http://", "https://", "file://")


def is_url(value: str) -> bool:
    return value.startswith(URL_SCHEMES)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto the target on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def is_fsspec_url(target: str | Path) -> bool:
    """A ``protocol://`` location (s3://, gs://, memory://, file://...): read and written with fsspec,
    so that workers on other machines share it. Path objects are always local."""
    return isinstance(target, str) and "://" in target


@contextlib.contextmanager
def open_output(target: str | Path) -> Iterator[Any]:
    """A binary handle that becomes ``target`` when closed: a local path through :func:`atomic_path`;
    an fsspec URL through fsspec, whose object stores show a whole object or none of it."""
    if not is_fsspec_url(target):
        with atomic_path(target) as tmp, open(tmp, "wb") as handle:
            yield handle
        return
    import fsspec

    fs, path = fsspec.core.url_to_fs(target)
    fs.makedirs(fs._parent(path), exist_ok=True)
    with fs.open(path, "wb") as handle:
        yield handle


def open_input(source: str | Path) -> Any:
    """A binary handle on a local path or an fsspec URL."""
    if not is_fsspec_url(source):
        return open(source, "rb")
    import fsspec

    return fsspec.open(source, "rb").open()


def sidecar(target: str | Path, suffix: str) -> str | Path:
    """``target`` with another suffix, for a path or a URL alike."""
    if not is_fsspec_url(target):
        return Path(target).with_suffix(suffix)
    stem, dot, old_suffix = target.rpartition(".")
    return f"{stem}{suffix}" if dot and "/" not in old_suffix else f"{target}{suffix}"


def write_text_atomic(target: str | Path, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(target: str | Path, data: Any) -> None:
    write_text_atomic(target, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_parquet_atomic(frame: Any, target: str | Path, **kwargs: Any) -> None:
    """Write a polars DataFrame as Parquet through a temporary file."""
    with atomic_path(target) as tmp:
        frame.write_parquet(tmp, **kwargs)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
