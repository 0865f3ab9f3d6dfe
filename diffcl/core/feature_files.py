"""Item feature matrices on disk: ``features/<modality>.parquet`` with an ``item`` column and a
fixed-size float32 ``embedding`` column, rows in item-id order, provenance in the Parquet metadata.
A modality is any name (:data:`diffcl.core.config.MODALITY_NAME`): image, text, audio, ...

The feature stage (``features/``) writes them; the graphs and the models read them back as a
zero-copy numpy matrix, through :func:`read_item_features`, which checks that the rows match the
prepared items and hold only finite numbers, and :func:`model_feature_files`, which fails when a
modality the configured model reads has no file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from diffcl.core.config import MODALITY_NAME
from diffcl.core.io import open_input, open_output

if TYPE_CHECKING:
    from diffcl.core.config import PipelineConfig

log = logging.getLogger(__name__)

METADATA_KEY = b"diffcl"


class FeatureFileError(ValueError):
    """A feature matrix that cannot be used; the message names the file and how to remake it."""


def check_finite(matrix: np.ndarray, origin: str, file_rows: np.ndarray | None = None) -> None:
    """Fail on the first row holding NaN or inf: such features train a NaN model without a word.
    ``file_rows`` maps the matrix rows to the rows of the file they came from, for the message."""
    bad = np.flatnonzero(~np.isfinite(matrix).all(axis=1))
    if bad.size:
        row = int(bad[0] if file_rows is None else file_rows[bad[0]])
        raise FeatureFileError(f"{origin}: row {row} holds NaN or inf ({bad.size} such row(s)); "
                               "features must be finite numbers")


def read_npy_matrix(path: Path) -> np.ndarray:
    """A shipped ``.npy`` feature matrix (memory-mapped): numeric and two-dimensional, never unpickled."""
    try:
        matrix = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise FeatureFileError(f"{path}: not a numeric .npy matrix ({err})") from None
    if matrix.ndim != 2 or not np.issubdtype(matrix.dtype, np.number):
        raise FeatureFileError(f"{path}: a {matrix.dtype} array of shape {matrix.shape}; "
                               "expected a numeric items x dimensions matrix")
    return matrix


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
    with open_output(path) as handle:  # a local path or an fsspec URL (a shared workspace)
        pq.write_table(table, handle)


def read_features(path: str | Path) -> tuple[np.ndarray, dict[str, Any]]:
    """(items x d float32 matrix in item-id order, provenance metadata)."""
    with open_input(path) as handle:
        frame = pl.read_parquet(handle, columns=["item", "embedding"])
    items = frame.get_column("item").to_numpy()
    if not np.array_equal(items, np.arange(len(items))):
        frame = frame.sort("item")
        items = frame.get_column("item").to_numpy()
        if not np.array_equal(items, np.arange(len(items))):
            raise ValueError(f"{path}: item ids are not 0..{len(items) - 1}")
    matrix = frame.get_column("embedding").to_numpy()
    check_finite(matrix, str(path))
    return matrix, read_metadata(path)


def read_item_features(path: Path, n_items: int) -> tuple[np.ndarray, dict[str, Any]]:
    """:func:`read_features` of a dataset's feature file: one row per prepared item, or an error."""
    matrix, meta = read_features(path)
    if matrix.shape[0] != n_items:
        raise FeatureFileError(f"{path}: {matrix.shape[0]} rows but the dataset has {n_items} items; "
                               "rerun `diffcl features`")
    return matrix, meta


def read_metadata(path: str | Path) -> dict[str, Any]:
    with open_input(path) as handle:
        meta = pq.read_schema(handle).metadata or {}
    return json.loads(meta.get(METADATA_KEY, b"{}"))


def is_feature_file(path: Path) -> bool:
    """A ``<modality>.parquet`` of this store (other Parquet files share the folder, e.g. image_sources)."""
    if path.suffix != ".parquet" or not MODALITY_NAME.fullmatch(path.stem):
        return False
    try:
        return {"item", "embedding"} <= set(pq.read_schema(path).names)
    except (OSError, pa.ArrowInvalid):
        return False


def available_features(features_dir: Path) -> dict[str, Path]:
    """Every modality's feature file in the folder, by name (sorted)."""
    found = sorted(features_dir.glob("*.parquet")) if features_dir.is_dir() else []
    return {p.stem: p for p in found if is_feature_file(p)}


def model_modalities(config: PipelineConfig) -> list[str]:
    """The modalities the configured model reads, in its ``modalities`` order (ID-only models have
    none), less those switched off with ``features.<text|image>.enabled: false``."""
    wanted = getattr(getattr(config.model, config.model.name, None), "modalities", [])
    return [m for m in dict.fromkeys(wanted) if config.features.enabled(m)]


def model_feature_files(config: PipelineConfig, features_dir: Path) -> dict[str, Path]:
    """The feature files of :func:`model_modalities`. A missing one is an error, not a silently
    smaller model, unless ``model.allow_missing_modalities`` is set."""
    found, wanted = available_features(features_dir), model_modalities(config)
    for modality in wanted:
        if modality in found:
            continue
        path, name = features_dir / f"{modality}.parquet", config.model.name
        if not config.model.allow_missing_modalities:
            raise FeatureFileError(
                f"model {name} reads the {modality} modality but {path} does not exist; run `diffcl features CONFIG` "
                f"(or drop {modality} from model.{name}.modalities, or set model.allow_missing_modalities: true)")
        log.warning("model %s runs without the %s modality: %s does not exist", name, modality, path)
    return {m: found[m] for m in wanted if m in found}
