"""A per-item embedding cache keyed by content: sha256 of the text or of the image bytes.

One Parquet file per (modality, encoder identity): changing the encoder starts a new file, so it
invalidates what that encoder touched and nothing else. When the item set grows, only items whose
content key is not in the cache are embedded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from diffcl.core.io import atomic_path, write_json_atomic


def content_key(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode("utf-8")
    return hashlib.sha256(data).hexdigest()


class EmbeddingCache:
    def __init__(self, folder: Path, modality: str, encoder_id: str):
        self.path = Path(folder) / f"{modality}-{encoder_id[:16]}.parquet"
        self._index: dict[str, int] = {}
        self._matrix: np.ndarray | None = None
        if self.path.exists():
            frame = pl.read_parquet(self.path)
            self._index = {key: i for i, key in enumerate(frame.get_column("key").to_list())}
            self._matrix = frame.get_column("embedding").to_numpy()

    def missing(self, keys: list[str]) -> list[str]:
        """Keys not cached yet, first occurrence order, no duplicates."""
        return [k for k in dict.fromkeys(keys) if k not in self._index]

    def add(self, keys: list[str], vectors: np.ndarray) -> None:
        if not keys:
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        start = 0 if self._matrix is None else len(self._matrix)
        self._matrix = vectors if self._matrix is None else np.concatenate([self._matrix, vectors])
        for i, key in enumerate(keys):
            self._index[key] = start + i
        self._write()

    @property
    def parts_dir(self) -> Path:
        """Where shards encoded elsewhere leave their vectors (:func:`write_part`) for :meth:`merge_parts`:
        next to this cache file, so that a part can only be merged into the encoder's own cache."""
        return self.path.with_suffix(".parts")

    def part_files(self) -> list[Path]:
        """The shard parts waiting to be merged, in part-name (item range) order."""
        return sorted(self.parts_dir.glob("*.parquet")) if self.parts_dir.is_dir() else []

    def part_keys(self) -> set[str]:
        """The keys the waiting shard parts hold vectors for."""
        return {key for part in self.part_files() for key in pl.read_parquet(part, columns=["key"]).get_column("key")}

    def merge_parts(self) -> int:
        """Add the vectors of every shard part, in part-name (item range) order so that the cache
        comes out the same whichever worker finished first; a key already cached keeps its vector.
        The parts are removed once merged. Returns the number of vectors added."""
        parts = self.part_files()
        added = 0
        for part in parts:
            frame = pl.read_parquet(part)
            keys = frame.get_column("key").to_list()
            first = {k: i for i, k in reversed(list(enumerate(keys)))}  # first row of each key
            fresh = [i for k, i in first.items() if k not in self._index]
            fresh.sort()
            if fresh:
                self.add([keys[i] for i in fresh], frame.get_column("embedding").to_numpy()[fresh])
                added += len(fresh)
        for part in parts:
            part.unlink()
        return added

    def lookup(self, keys: list[str]) -> np.ndarray:
        rows = np.fromiter((self._index[k] for k in keys), dtype=np.int64, count=len(keys))
        return self._matrix[rows]

    def _write(self) -> None:
        _write_vectors(self.path, sorted(self._index, key=self._index.get), self._matrix)


def _write_vectors(path: Path, keys: list[str], matrix: np.ndarray) -> None:
    d = matrix.shape[1]
    table = pa.table({
        "key": pa.array(keys),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).ravel(), type=pa.float32()), d),
    })
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def write_part(cache: EmbeddingCache, name: str, keys: list[str], vectors: np.ndarray) -> Path:
    """One shard's freshly encoded vectors as ``<cache>.parts/<name>.parquet``: shards never write the
    cache itself (concurrent writers would lose each other's rows); :meth:`EmbeddingCache.merge_parts` does."""
    path = cache.parts_dir / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_vectors(path, keys, np.asarray(vectors, dtype=np.float32))
    return path


def weights_hash(path: Path, memo_file: Path) -> str:
    """sha256 over the files of a local model folder (or one checkpoint file), memoised by path,
    size and mtime so that a no-op rerun does not read hundreds of MB again."""
    files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file() and not p.name.startswith("."))
    signature = json.dumps([(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    memo: dict[str, str] = {}
    if memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text())
        except json.JSONDecodeError:
            memo = {}
    sig_key = content_key(signature)
    if sig_key in memo:
        return memo[sig_key]
    digest = hashlib.sha256()
    for p in files:
        digest.update(os.fsencode(p.relative_to(path) if path.is_dir() else p.name))
        with open(p, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    memo[sig_key] = digest.hexdigest()
    write_json_atomic(memo_file, memo)
    return memo[sig_key]
