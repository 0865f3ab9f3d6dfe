"""The data stage: fetch the sources, parse, filter, re-index and split into prepared Parquet.

Outputs under ``<workspace>/<dataset>/prepared/``:

- ``interactions.parquet``: user, item (contiguous int ids), split, and rating / timestamp /
  position where the source has them;
- ``items.parquet``: item, item_id (original), title, brand, categories, description, text
  (assembled with the standard recipe), image_url, and source_row (row of a shipped feature matrix);
- ``users.parquet``: user, user_id (original);
- ``stats.json``: counts per split, density, malformed-record counts, input hashes, and the sha256
  of each table above. Written last: the tables are renamed into place one by one, and the readers
  check them against these hashes (:func:`diffcl.data.verify_prepared`), so a run killed between
  two renames leaves a set that every later stage rejects instead of a silently mixed one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diffcl.core.config import PipelineConfig, PrepareConfig
from diffcl.core.io import write_json_atomic, write_parquet_atomic
from diffcl.core.prepared import table_hashes
from diffcl.core.workspace import DatasetDirs
from features.fetch import FetchError, Manifest, fetch, local_manifest, verified_copy
from features.filtering import SplitEnum, assign_split, deduplicate, kcore, users_without_train
from features.item_text import DEFAULT_RECIPE, assemble
from features.readers import RawData, read_dataset
from features.records import DataError
from features.sources import SourceFile, source_files
from pipeline.versions import STAGE_VERSIONS

log = logging.getLogger(__name__)



@dataclass
class PrepareResult:
    dirs: DatasetDirs
    stats: dict[str, Any]
    outputs: dict[str, Path] = field(default_factory=dict)


def acquire(config: PipelineConfig, progress: bool = True) -> dict[str, tuple[Path, Manifest]]:
    """Fetch remote sources into ``raw/`` and describe local ones: role -> (file, manifest)."""
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    files: dict[str, tuple[Path, Manifest]] = {}
    sources = source_files(config.dataset)
    names = [s.filename for s in sources if s.is_remote]
    if len(set(names)) != len(names):
        raise DataError(f"dataset {config.dataset.name}: two remote sources share a file name {names}")
    for source in sources:
        files[source.role] = _acquire_one(source, dirs, config, progress)
    return files


def _acquire_one(source: SourceFile, dirs: DatasetDirs, config: PipelineConfig, progress: bool) -> tuple[Path, Manifest]:
    if source.is_remote:
        f = config.fetch
        dest = dirs.raw / source.filename
        try:
            result = fetch(
                source.location,
                dest,
                timeout_s=f.timeout_s,
                retries=f.retries,
                backoff_s=f.backoff_s,
                max_backoff_s=f.max_backoff_s,
                check_remote=f.check_remote,
                progress=progress,
            )
        except FetchError as err:
            return dest, _offline_fallback(source, dest, err, f.offline_ok)
        return result.path, result.manifest
    path = source.local_path()
    if not path.exists():
        raise DataError(f"dataset.{source.role}: file not found: {path}")
    return path, local_manifest(path, source.location)


def _offline_fallback(source: SourceFile, dest: Path, err: FetchError, offline_ok: bool) -> Manifest:
    """The verified copy in raw/ while its server is unreachable, if ``fetch.offline_ok`` allows it."""
    copy = verified_copy(source.location, dest) if err.transient else None
    if copy is None:
        raise err
    if not offline_ok:
        raise FetchError(f"{err}; {dest} holds a verified copy (fetched {copy.fetched_at}): set fetch.offline_ok=true "
                         "to go on with it", transient=True) from None
    log.warning("%s: server unreachable (%s); going on with the verified copy %s fetched %s (fetch.offline_ok)",
                source.role, err, dest, copy.fetched_at)
    return copy


def stats_content_hash(stats: dict[str, Any]) -> str:
    """The sha256 of stats.json without source locations: what later stages are keyed on, so that
    moving identical data to another path or URL reruns nothing."""
    content = {**stats,
               "inputs": {role: {k: v for k, v in m.items() if k != "url"} for role, m in stats.get("inputs", {}).items()},
               "malformed": {Path(p).name: v for p, v in stats.get("malformed", {}).items()},
               "precomputed_features": {k: Path(v).name for k, v in stats.get("precomputed_features", {}).items()}}
    content.pop("seconds", None)
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def prepare(config: PipelineConfig, progress: bool = True,
            acquired: dict[str, tuple[Path, Manifest]] | None = None) -> PrepareResult:
    """The data stage; ``acquired`` (from :func:`acquire`) skips the fetch when given."""
    started = time.perf_counter()
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    ds, prep = config.dataset, config.prepare

    acquired = acquire(config, progress) if acquired is None else acquired
    manifests = {role: m for role, (_, m) in acquired.items()}
    t_fetch = time.perf_counter()

    raw = read_dataset(ds, {role: path for role, (path, _) in acquired.items()})
    for report in raw.reports:
        report.check(prep.max_bad_share)
        if report.bad:
            log.warning("%s: skipped %d malformed record(s) of %d (first at line %s: %s)",
                        report.path, report.bad, report.records, report.first_bad_line, report.first_bad_reason)
    t_read = time.perf_counter()

    tables = _build_tables(raw, config)
    interactions, users, items = tables.interactions, tables.users, tables.items
    if tables.cold_start_users:
        log.warning("%s: dropped %d user(s) without a training interaction and their %d valid/test "
                    "interaction(s), as MMRec does (stats.json: cold_start_users)",
                    ds.name, tables.cold_start_users, tables.cold_start_interactions)
    if tables.held_out_chosen:
        log.info("%s: held out %d item(s) from training, half for valid and half for test (prepare.held_out_items); "
                 "%d of them keep a valid/test interaction once the users without a training interaction are dropped "
                 "(stats.json: held_out_items)",
                 ds.name, tables.held_out_chosen, tables.held_out_items)
    t_build = time.perf_counter()

    dirs.prepared.mkdir(parents=True, exist_ok=True)
    outputs = {
        "interactions": dirs.prepared / "interactions.parquet",
        "items": dirs.prepared / "items.parquet",
        "users": dirs.prepared / "users.parquet",
        "stats": dirs.prepared / "stats.json",
    }
    write_parquet_atomic(interactions, outputs["interactions"])
    write_parquet_atomic(items, outputs["items"])
    write_parquet_atomic(users, outputs["users"])

    counts = interactions.get_column("split").value_counts()
    per_split = {row["split"]: row["count"] for row in counts.iter_rows(named=True)}
    n_users, n_items = users.height, items.height
    stats = {
        "dataset": ds.name,
        "source": ds.source,
        "users": n_users,
        "items": n_items,
        "interactions": interactions.height,
        "train": per_split.get("train", 0),
        "valid": per_split.get("valid", 0),
        "test": per_split.get("test", 0),
        "density": interactions.height / (n_users * n_items),
        "split": tables.split,
        "kcore": tables.kcore,
        "cold_start_users": tables.cold_start_users,
        "cold_start_interactions": tables.cold_start_interactions,
        # Only where the protocol asks, so that the usual protocol's stats (and the stages keyed on them) stay as they were.
        **({"held_out_items": tables.held_out_items} if tables.held_out_chosen else {}),
        "items_with_text": int(items.get_column("text").is_not_null().sum()),
        "items_with_image_url": int(items.get_column("image_url").is_not_null().sum()),
        "malformed": {r.path: {"records": r.records, "bad": r.bad} for r in raw.reports},
        "inputs": {name: {"url": m.url, "size": m.size, "sha256": m.sha256} for name, m in manifests.items()},
        "precomputed_features": {k: str(v) for k, v in raw.precomputed.items()},
        "stage_version": STAGE_VERSIONS["prepare"],
        "tables": table_hashes(dirs.prepared),
    }
    # stats.json holds only what the data determine, so that equal inputs give an identical file
    # (the orchestration keys later stages on its hash); timings are returned, not written.
    write_json_atomic(outputs["stats"], stats)
    stats = {**stats, "seconds": {
        "fetch": round(t_fetch - started, 3),
        "read": round(t_read - t_fetch, 3),
        "filter_split": round(t_build - t_read, 3),
        "total": round(time.perf_counter() - started, 3),
    }}
    return PrepareResult(dirs=dirs, stats=stats, outputs=outputs)


def _split_kind(raw: RawData, wanted: str) -> str:
    if wanted == "auto":
        return "shipped" if "split" in raw.interactions.columns else "random"
    return wanted


AUTO_KCORE = 5  # prepare.kcore null on data without a shipped split: the field's 5-core


def effective_kcore(prep: PrepareConfig, split_kind: str) -> int:
    """prepare.kcore, or where it is null (auto): 1 (no filtering) when the shipped split is used,
    since a published benchmark is taken as published, else the 5-core."""
    if prep.kcore is not None:
        return prep.kcore
    return 1 if split_kind == "shipped" else AUTO_KCORE


@dataclass
class Tables:
    interactions: pl.DataFrame
    users: pl.DataFrame
    items: pl.DataFrame
    split: str  # shipped | random | chronological: the split actually used
    kcore: int  # the k-core actually applied (prepare.kcore, or its auto value)
    cold_start_users: int = 0  # users dropped for want of a training interaction
    cold_start_interactions: int = 0  # their valid / test interactions, dropped with them
    # prepare.held_out_items: the items chosen, and those of them that still have a valid / test
    # interaction after the cold-start users are dropped (the held-out items evaluation asks about)
    held_out_chosen: int = 0
    held_out_items: int = 0


def _build_tables(raw: RawData, config: PipelineConfig) -> Tables:
    prep, origin = config.prepare, f"dataset {config.dataset.name}"
    frame = raw.interactions
    if frame.height == 0:
        raise DataError(f"{origin}: no interactions were read")
    if prep.min_rating is not None:
        if "rating" not in frame.columns or frame.get_column("rating").is_null().all():
            raise DataError(f"{origin}: prepare.min_rating is set but the source has no ratings")
        frame = frame.filter(pl.col("rating") >= prep.min_rating)
    frame = deduplicate(frame)
    kind = _split_kind(raw, prep.split)
    k = effective_kcore(prep, kind)
    frame = kcore(frame, k)
    if frame.height == 0:
        raise DataError(f"{origin}: no interactions left after filtering (kcore={k}, "
                        f"min_rating={prep.min_rating}); lower prepare.kcore")

    users = _id_table(frame, "user")
    items_ids = _id_table(_with_catalogue(frame, raw.items) if k <= 1 else frame, "item")
    frame = (
        frame.join(users.select("user_id", "user"), on="user_id")
        .join(items_ids.select("item_id", "item"), on="item_id")
    )

    if kind == "shipped":
        if "split" not in frame.columns:
            raise DataError(f"{origin}: prepare.split is 'shipped' but the source has no split")
        frame = frame.with_columns(pl.col("split").cast(SplitEnum))
    elif kind == "chronological":
        order = "timestamp" if "timestamp" in frame.columns else "position" if "position" in frame.columns else None
        if order is None or frame.get_column(order).is_null().any():
            raise DataError(f"{origin}: a chronological split needs a timestamp or position for every interaction")
        frame = assign_split(frame, ratios=prep.ratios, seed=prep.seed, order=order)
    else:
        frame = assign_split(frame, ratios=prep.ratios, seed=prep.seed)
    frame, held_out = _hold_out_items(frame, prep.held_out_items, prep.seed)
    before = frame.height
    frame, users, cold = _drop_cold_start_users(frame, users)  # every user left has a training item
    held_out_kept = frame.filter(pl.col("item").is_in(held_out.tolist())).get_column("item").n_unique()

    keep = ["user", "item", "split"] + [c for c in ("rating", "timestamp", "position") if c in frame.columns]
    interactions = frame.select(keep).sort("user", "item")
    items = _item_table(items_ids, raw.items)
    return Tables(interactions, users.select("user", "user_id"), items, kind, k, cold, before - frame.height,
                  len(held_out), held_out_kept)


def _hold_out_items(frame: pl.DataFrame, share: float, seed: int) -> tuple[pl.DataFrame, np.ndarray]:
    """prepare.held_out_items: a seeded ``share`` of the interacted items lose their training
    interactions, the first half of them to valid and the rest to test (every interaction of an item
    in one split, so validation and test ask about different new items)."""
    if share <= 0:
        return frame, np.empty(0, dtype=np.int64)
    items = frame.get_column("item").unique().sort().to_numpy()
    n = int(round(share * len(items)))
    if n < 2:
        raise DataError(f"prepare.held_out_items {share} holds out {n} of {len(items)} items: at least 2 are needed "
                        "(one for valid, one for test); raise the share")
    # A stream of its own, so the per-user split of the other items stays what prepare.seed gives.
    chosen = np.random.default_rng([seed, 1]).permutation(items)[:n]
    to_valid, to_test = chosen[: n // 2], chosen[n // 2 :]
    split = (pl.when(pl.col("item").is_in(to_valid.tolist())).then(pl.lit("valid"))
             .when(pl.col("item").is_in(to_test.tolist())).then(pl.lit("test"))
             .otherwise(pl.col("split").cast(pl.String)))
    return frame.with_columns(split.cast(SplitEnum).alias("split")), chosen


def _with_catalogue(frame: pl.DataFrame, catalogue: pl.DataFrame | None) -> pl.DataFrame:
    """The interactions' items plus every item of an MMRec catalogue (item_key = feature row), so that
    unfiltered data keep each item and its feature row, with or without interactions."""
    if catalogue is None or "item_key" not in catalogue.columns or "item_key" not in frame.columns:
        return frame
    columns = ["item_id", "item_key"]
    return pl.concat([frame.select(columns), catalogue.select(columns)], how="vertical_relaxed")


def _drop_cold_start_users(frame: pl.DataFrame, users: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Users without a training interaction cannot be represented by the model: MMRec drops them
    (from evaluation too), and so does this. The others keep their order under new contiguous ids."""
    cold = users_without_train(frame)
    if cold.len() == 0:
        return frame, users, 0
    users = (users.filter(~pl.col("user").is_in(cold.implode())).sort("user").drop("user")
             .with_row_index("user").with_columns(pl.col("user").cast(pl.Int64)))
    frame = frame.drop("user").join(users.select("user_id", "user"), on="user_id")
    return frame, users, cold.len()


def _id_table(frame: pl.DataFrame, kind: str) -> pl.DataFrame:
    """Contiguous ids in the order of the source's own integer ids where it has them (MMRec),
    else of the original string ids: deterministic, and an unfiltered MMRec dataset keeps its ids."""
    key, name = f"{kind}_key", f"{kind}_id"
    cols = [name, key] if key in frame.columns else [name]
    table = frame.select(cols).unique(name).sort(cols[-1])
    return table.with_row_index(kind).with_columns(pl.col(kind).cast(pl.Int64))


def _item_table(ids: pl.DataFrame, meta: pl.DataFrame | None) -> pl.DataFrame:
    table = ids
    if meta is not None:
        join_on = "item_key" if "item_key" in meta.columns and "item_key" in ids.columns else "item_id"
        meta = meta.unique(join_on, keep="first")
        if join_on == "item_key" and "item_id" in meta.columns:
            meta = meta.drop("item_id")
        table = table.join(meta, on=join_on, how="left")
    for name, dtype in (("title", pl.String), ("brand", pl.String), ("categories", pl.List(pl.String)),
                        ("description", pl.String), ("text", pl.String), ("image_url", pl.String)):
        if name not in table.columns:
            table = table.with_columns(pl.lit(None, dtype=dtype).alias(name))
    assembled = pl.struct("title", "brand", "categories", "description").map_elements(
        lambda row: assemble(row, DEFAULT_RECIPE) or None, return_dtype=pl.String
    )
    table = table.with_columns(pl.coalesce(pl.col("text"), assembled).alias("text"))
    source_row = pl.col("item_key") if "item_key" in table.columns else pl.lit(None, dtype=pl.Int64)
    return table.select(
        "item", "item_id", "title", "brand", "categories", "description", "text", "image_url",
        source_row.alias("source_row"),
    ).sort("item")
