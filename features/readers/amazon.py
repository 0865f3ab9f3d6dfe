"""The three generations of the McAuley-lab Amazon dumps (see docs: amazon-formats.md).

Each generation maps its own field names onto the normalised columns; records without the ids
they need are counted as malformed. Metadata lines are pre-filtered on the raw text for the item
ids that occur in the reviews, so that the (slow) literal parsing of 2014 metadata is spent only on
the items that are used.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from features.item_text import clean, clean_list
from features.readers.base import RawData
from features.records import ParseReport, iter_records


@dataclass(frozen=True)
class Generation:
    user: str
    item: str
    rating: str
    timestamp: str
    timestamp_scale: int  # divide by this to get seconds
    meta_item: str
    literal_meta: bool  # 2014 metadata lines are Python literals
    item_fields: Callable[[dict[str, Any]], dict[str, Any]]


def _meta_2014(rec: dict[str, Any]) -> dict[str, Any]:
    paths = rec.get("categories") or []
    first_path = paths[0] if paths and isinstance(paths[0], list) else paths
    return {
        "title": clean(rec.get("title")),
        "brand": clean(rec.get("brand")),
        "categories": clean_list(first_path),
        "description": clean(rec.get("description")),
        "image_url": rec.get("imUrl") or None,
    }


def _first(values: Any) -> str | None:
    if isinstance(values, list):
        return next((v for v in values if isinstance(v, str) and v), None)
    return values or None


def _meta_2018(rec: dict[str, Any]) -> dict[str, Any]:
    return {
        "title": clean(rec.get("title")),
        "brand": clean(rec.get("brand")),
        "categories": clean_list(rec.get("category")),
        "description": clean(rec.get("description")),
        "image_url": _first(rec.get("imageURLHighRes")) or _first(rec.get("imageURL")),
    }


def _main_image_2023(images: Any) -> str | None:
    if not isinstance(images, list) or not images:
        return None
    main = next((im for im in images if isinstance(im, dict) and im.get("variant") == "MAIN"), None)
    chosen = main or (images[0] if isinstance(images[0], dict) else {})
    return chosen.get("large") or chosen.get("hi_res") or chosen.get("thumb") or None


def _meta_2023(rec: dict[str, Any]) -> dict[str, Any]:
    details = rec.get("details") if isinstance(rec.get("details"), dict) else {}
    return {
        "title": clean(rec.get("title")),
        "brand": clean(rec.get("store") or details.get("Brand")),
        "categories": clean_list(rec.get("categories")) or clean_list([rec.get("main_category")]),
        "description": clean(rec.get("description")),
        "image_url": _main_image_2023(rec.get("images")),
    }


GENERATIONS = {
    "amazon2014": Generation("reviewerID", "asin", "overall", "unixReviewTime", 1, "asin", True, _meta_2014),
    "amazon2018": Generation("reviewerID", "asin", "overall", "unixReviewTime", 1, "asin", False, _meta_2018),
    "amazon2023": Generation("user_id", "parent_asin", "rating", "timestamp", 1000, "parent_asin", False, _meta_2023),
}


def _as_float(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _as_int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def read_reviews(path: Path, gen: Generation) -> tuple[pl.DataFrame, ParseReport]:
    report = ParseReport(str(path))
    users: list[str] = []
    items: list[str] = []
    ratings: list[float | None] = []
    times: list[int | None] = []
    for rec in iter_records(path, report):
        user, item = rec.get(gen.user), rec.get(gen.item)
        if not isinstance(user, str) or not isinstance(item, str) or not user or not item:
            report.add_bad(report.records, str(rec), f"missing {gen.user} or {gen.item}")
            continue
        users.append(user)
        items.append(item)
        ratings.append(_as_float(rec.get(gen.rating)))
        ts = _as_int(rec.get(gen.timestamp))
        times.append(ts // gen.timestamp_scale if ts is not None else None)
    frame = pl.DataFrame(
        {"user_id": users, "item_id": items, "rating": ratings, "timestamp": times},
        schema={"user_id": pl.String, "item_id": pl.String, "rating": pl.Float64, "timestamp": pl.Int64},
    )
    return frame, report


def read_meta(path: Path, gen: Generation, wanted: set[str]) -> tuple[pl.DataFrame, ParseReport]:
    report = ParseReport(str(path))
    quote = "[\"']"
    id_pattern = re.compile(quote + re.escape(gen.meta_item) + quote + r"\s*:\s*" + quote + r"([^\"']+)" + quote)

    def keep_line(line: str) -> bool:
        match = id_pattern.search(line)
        return match is None or match.group(1) in wanted  # no match: let the parser judge it

    rows: dict[str, dict[str, Any]] = {}
    for rec in iter_records(path, report, allow_literal=gen.literal_meta, keep_line=keep_line):
        item = rec.get(gen.meta_item)
        if not isinstance(item, str) or not item:
            report.add_bad(report.records, str(rec), f"missing {gen.meta_item}")
            continue
        if item in wanted and item not in rows:
            rows[item] = {"item_id": item, **gen.item_fields(rec)}
    frame = pl.DataFrame(
        list(rows.values()),
        schema={
            "item_id": pl.String,
            "title": pl.String,
            "brand": pl.String,
            "categories": pl.List(pl.String),
            "description": pl.String,
            "image_url": pl.String,
        },
    )
    return frame, report


def read_amazon(source: str, reviews: Path, meta: Path | None) -> RawData:
    gen = GENERATIONS[source]
    interactions, review_report = read_reviews(reviews, gen)
    reports = [review_report]
    items = None
    if meta is not None:
        wanted = set(interactions.get_column("item_id").unique().to_list())
        items, meta_report = read_meta(meta, gen, wanted)
        reports.append(meta_report)
    return RawData(interactions=interactions, items=items, reports=reports)
