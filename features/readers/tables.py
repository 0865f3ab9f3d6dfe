"""Plain tables (CSV, TSV, Parquet, JSON lines) with column names from the config."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from diffcl.core.config import Columns
from features.readers.base import RawData
from features.records import DataError, describe_read_error

SPLIT_VALUES = {"0": "train", "1": "valid", "2": "test", "train": "train", "valid": "valid",
                "validation": "valid", "val": "valid", "test": "test"}
INTERACTION_ROLES = ("user", "item", "rating", "timestamp", "position", "split")
ITEM_ROLES = ("item", "title", "brand", "categories", "description", "text", "image_url")


def _format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.name.lower().removesuffix(".gz")
    for suffix, kind in ((".parquet", "parquet"), (".tsv", "tsv"), (".tab", "tsv"), (".csv", "csv"),
                         (".jsonl", "jsonl"), (".ndjson", "jsonl"), (".json", "jsonl")):
        if name.endswith(suffix):
            return kind
    raise DataError(f"{path}: cannot tell the table format from the name; set dataset.format")


def read_table(path: Path, fmt: str) -> pl.DataFrame:
    if not path.exists():
        raise DataError(f"table not found: {path}")
    kind = _format(path, fmt)
    try:
        if kind == "parquet":
            return pl.read_parquet(path)
        if kind == "jsonl":
            return pl.read_ndjson(path)
        return pl.read_csv(path, separator="\t" if kind == "tsv" else ",", infer_schema_length=10000,
                           quote_char=None if kind == "tsv" else '"')
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError, OSError) as err:
        raise DataError(f"{path}: cannot be read as {kind}: {describe_read_error(path, err)}") from err


def _select(frame: pl.DataFrame, path: Path, columns: Columns, roles: tuple[str, ...]) -> pl.DataFrame:
    named = {role: getattr(columns, role) for role in roles if getattr(columns, role)}
    unknown = {role: col for role, col in named.items() if col not in frame.columns}
    if unknown:
        details = ", ".join(f"dataset.columns.{role}={col!r}" for role, col in unknown.items())
        raise DataError(f"{path}: unknown column(s) {details}; the file has {frame.columns}")
    out_name = {"user": "user_id", "item": "item_id"}
    return frame.select(pl.col(col).alias(out_name.get(role, role)) for role, col in named.items())


def read_tables(interactions: Path, items: Path | None, columns: Columns, fmt: str) -> RawData:
    inter = _select(read_table(interactions, fmt), interactions, columns, INTERACTION_ROLES)
    casts = [pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String)]
    if "rating" in inter.columns:
        casts.append(pl.col("rating").cast(pl.Float64))
    if "position" in inter.columns:
        casts.append(pl.col("position").cast(pl.Int64))
    if "timestamp" in inter.columns:
        ts = inter.schema["timestamp"]
        casts.append(pl.col("timestamp").dt.epoch("s") if ts.is_temporal() else pl.col("timestamp").cast(pl.Int64))
    if "split" in inter.columns:
        values = inter.get_column("split").cast(pl.String).str.to_lowercase()
        unknown = sorted(set(values.unique().drop_nulls().to_list()) - set(SPLIT_VALUES))
        if unknown:
            raise DataError(f"{interactions}: split column {columns.split!r} has values {unknown[:5]}; "
                            "expected 0/1/2 or train/valid/test")
        casts.append(pl.col("split").cast(pl.String).str.to_lowercase().replace_strict(SPLIT_VALUES))
    inter = inter.with_columns(casts)

    item_table = None
    if items is not None:
        item_table = _select(read_table(items, fmt), items, columns, ITEM_ROLES)
        item_table = item_table.with_columns(pl.col("item_id").cast(pl.String))
        if "categories" in item_table.columns and item_table.schema["categories"] == pl.String:
            item_table = item_table.with_columns(pl.col("categories").str.split("|"))
    return RawData(interactions=inter, items=item_table)
