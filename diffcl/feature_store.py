"""Item feature matrices on disk: ``features/<modality>.parquet`` with an ``item`` column and a
fixed-size float32 ``embedding`` column, rows in item-id order, provenance in the Parquet metadata.

The feature stage (``features/``) writes them; the graphs and the models read them back as a
zero-copy numpy matrix.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from diffcl.io import atomic_path

MODALITIES = ("image", "text")
METADATA_KEY = b"diffcl"


def write_features(path: str | Path, matrix: np.ndarray, metadata: dict[str, Any] | None = None,
                   extra_columns: dict[str, np.ndarray] | None = None) -> None:
    """Write an items x d float32 matrix (row i = item i) with JSON provenance metadata."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    n, d = matrix.shape
    embedding = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel(), type=pa.float32()), d)
    columns = {"item": pa.array(np.arange(n, dtype=np.int64)), "embedding": embedding}
    for name, values in (extra_columns or {}).items():
        columns[name] = pa.array(values)
    table = pa.table(columns)
    meta = {"dim": d, "items": n, **(metadata or {})}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta, default=str).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_features(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(items x d float32 matrix in item-id order, provenance metadata)."""
    path = Path(path)
    frame = pl.read_parquet(path, columns=["item", "embedding"])
    items = frame.get_column("item").to_numpy()
    if not np.array_equal(items, np.arange(len(items))):
        frame = frame.sort("item")
        items = frame.get_column("item").to_numpy()
        if not np.array_equal(items, np.arange(len(items))):
            raise ValueError(f"{path}: item ids are not 0..{len(items) - 1}")
    matrix = frame.get_column("embedding").to_numpy()
    return matrix, read_metadata(path)


def read_metadata(path: str | Path) -> dict[str, Any]:
    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))


def available_features(features_dir: Path) -> dict[str, Path]:
    return {m: features_dir / f"{m}.parquet" for m in MODALITIES if (features_dir / f"{m}.parquet").exists()}
