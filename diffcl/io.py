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
