"""Pick the reader for a dataset config."""

from __future__ import annotations

from pathlib import Path

from diffcl.core.config import DatasetConfig
from features.readers.amazon import read_amazon
from features.readers.base import RawData
from features.readers.mmrec import read_mmrec
from features.readers.tables import read_tables


def read_dataset(dataset: DatasetConfig, files: dict[str, Path]) -> RawData:
    """``files`` maps roles (reviews, meta, interactions, items) to local files, already fetched."""
    if dataset.source == "mmrec":
        return read_mmrec(Path(dataset.path))
    if dataset.source == "tables":
        return read_tables(files["interactions"], files.get("items"), dataset.columns, dataset.format)
    return read_amazon(dataset.source, files["reviews"], files.get("meta"))
