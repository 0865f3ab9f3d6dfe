"""MMRec's processed form: ``<name>.inter`` (TAB; userID, itemID, optional rating / timestamp,
x_label 0/1/2), ``u_id_mapping.csv`` and ``i_id_mapping.csv`` (TAB), optional ``<name>_url.csv``
(itemID, asin, imUrl) and optional ``<modality>_feat.npy`` of any modality name (image_feat.npy,
text_feat.npy, audio_feat.npy, ...; row = itemID)."""

from __future__ import annotations

import logging
from pathlib import Path

import polars as pl

from diffcl.core.config import check_modality_name
from diffcl.core.feature_files import FeatureFileError, read_npy_matrix
from features.readers.base import RawData
from features.records import DataError, describe_read_error

log = logging.getLogger(__name__)

SPLIT_CODES = {0: "train", 1: "valid", 2: "test"}
FEATURE_SUFFIX = "_feat.npy"


def _read_tsv(path: Path, **kwargs) -> pl.DataFrame:
    try:
        return pl.read_csv(path, separator="\t", quote_char=None, **kwargs)
    except (pl.exceptions.ComputeError, pl.exceptions.NoDataError) as err:
        raise DataError(f"{path}: cannot be read as a TAB-separated table: {describe_read_error(path, err)}") from err


def _require(frame: pl.DataFrame, path: Path, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {frame.columns}")


def read_mmrec(folder: Path) -> RawData:
    if not folder.is_dir():
        raise DataError(f"MMRec dataset folder not found: {folder}")
    inter_files = sorted(folder.glob("*.inter"))
    if len(inter_files) != 1:
        raise DataError(f"{folder}: expected exactly one <name>.inter file, found {[p.name for p in inter_files]}")
    inter_path = inter_files[0]
    # Read as text and checked column by column, so that a bad value is named with its line
    # wherever it is (type inference looks at the first rows only).
    inter = _read_tsv(inter_path, infer_schema=False)
    _require(inter, inter_path, ["userID", "itemID"])
    inter = _as_numbers(inter, inter_path, {"userID": pl.Int64, "itemID": pl.Int64, "timestamp": pl.Int64,
                                            "rating": pl.Float64, "x_label": pl.Int64})
    if "x_label" in inter.columns:
        bad = inter.filter(~pl.col("x_label").is_in(list(SPLIT_CODES)))
        if bad.height:
            raise DataError(f"{inter_path}: x_label must be 0, 1 or 2; found {bad.get_column('x_label').unique().to_list()[:5]}")

    users = _mapping(folder / "u_id_mapping.csv", "user_id", "userID")
    items = _mapping(folder / "i_id_mapping.csv", "asin", "itemID")
    frame = inter.select(
        pl.col("userID").alias("user_key"),
        pl.col("itemID").alias("item_key"),
        *([pl.col("rating")] if "rating" in inter.columns else []),
        *([pl.col("timestamp")] if "timestamp" in inter.columns else []),
        *(
            [pl.col("x_label").replace_strict(SPLIT_CODES, return_dtype=pl.String).alias("split")]
            if "x_label" in inter.columns
            else []
        ),
    )
    # Original ids where the maps exist, else the integer ids as strings.
    frame = frame.join(users, on="user_key", how="left") if users is not None else frame
    frame = frame.join(items, on="item_key", how="left") if items is not None else frame
    frame = frame.with_columns(
        pl.coalesce(pl.col("user_id") if users is not None else None, pl.col("user_key").cast(pl.String)).alias("user_id"),
        pl.coalesce(pl.col("item_id") if items is not None else None, pl.col("item_key").cast(pl.String)).alias("item_id"),
    )

    n_items = items.height if items is not None else int(frame.get_column("item_key").max()) + 1
    item_table = _items(folder, inter_path.stem, _catalogue(n_items, items))
    return RawData(interactions=frame, items=item_table, precomputed=_shipped_features(folder, n_items))


def _catalogue(n_items: int, items: pl.DataFrame | None) -> pl.DataFrame:
    """Every MMRec item id 0..n_items-1 (a feature row each), with its original id where mapped."""
    keys = pl.DataFrame({"item_key": pl.int_range(n_items, dtype=pl.Int64, eager=True)})
    table = keys.join(items, on="item_key", how="left") if items is not None else keys.with_columns(
        pl.lit(None, dtype=pl.String).alias("item_id"))
    return table.with_columns(pl.coalesce("item_id", pl.col("item_key").cast(pl.String)).alias("item_id"))


def _shipped_features(folder: Path, n_items: int) -> dict[str, Path]:
    """The ``<modality>_feat.npy`` files by modality name, one row per MMRec item id: a matrix with
    another row count belongs to another dataset (or version), and its rows would be read for the
    wrong items."""
    shipped = {}
    for path in sorted(folder.glob(f"*{FEATURE_SUFFIX}")):
        modality = path.name.removesuffix(FEATURE_SUFFIX)
        try:
            check_modality_name(modality)
        except ValueError as err:
            log.warning("%s: not imported: %s", path, err)
            continue
        try:
            rows = read_npy_matrix(path).shape[0]
        except FeatureFileError as err:
            raise DataError(str(err)) from None
        if rows != n_items:
            raise DataError(f"{path}: {rows} rows but the dataset has {n_items} items (itemID 0..{n_items - 1})")
        shipped[modality] = path
    return shipped


def _as_numbers(frame: pl.DataFrame, path: Path, dtypes: dict[str, pl.DataType]) -> pl.DataFrame:
    """The text columns named in ``dtypes`` (those present) cast to them; the first value that is not
    a number of that type, or an empty cell, is named with its line (the header is line 1)."""
    for column, dtype in dtypes.items():
        if column not in frame.columns:
            continue
        text = frame.get_column(column)
        values = text.str.strip_chars().cast(dtype, strict=False)
        bad = values.is_null()
        if bad.any():
            row = int(bad.arg_max())
            found = "an empty cell" if text[row] is None else repr(text[row])
            kind = "an integer" if dtype == pl.Int64 else "a number"
            raise DataError(f"{path}, line {row + 2}: {column} must be {kind}, found {found}")
        frame = frame.with_columns(values.alias(column))
    return frame


def _mapping(path: Path, original: str, key: str) -> pl.DataFrame | None:
    if not path.exists():
        return None
    table = _read_tsv(path, infer_schema=False)
    _require(table, path, [original, key])
    table = _as_numbers(table, path, {key: pl.Int64})
    kind = "user" if key == "userID" else "item"
    return table.select(pl.col(key).alias(f"{kind}_key"), pl.col(original).alias(f"{kind}_id"))


def _items(folder: Path, name: str, items: pl.DataFrame) -> pl.DataFrame:
    url_path = folder / f"{name}_url.csv"
    if url_path.exists():
        try:
            urls = pl.read_csv(url_path, infer_schema=False)
        except pl.exceptions.ComputeError as err:
            raise DataError(f"{url_path}: cannot be read as CSV: {describe_read_error(url_path, err)}") from err
        _require(urls, url_path, ["itemID", "imUrl"])
        urls = urls.select(
            pl.col("itemID").cast(pl.Int64).alias("item_key"),
            pl.when(pl.col("imUrl").str.strip_chars() != "").then(pl.col("imUrl")).alias("image_url"),
        )
        return items.join(urls, on="item_key", how="left")
    return items
