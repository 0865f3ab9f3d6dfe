"""The normalised form every reader returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from features.records import ParseReport

# Interactions: user_id and item_id (strings) always; rating (f64), timestamp (i64 unix seconds),
# position (i64, order in the user's history) and split ("train" / "valid" / "test") where known.
# user_key / item_key (i64) order the ids when new contiguous ids are assigned: MMRec's own integer
# ids, so that an unfiltered MMRec dataset keeps them (and its feature rows stay aligned).
INTERACTION_COLUMNS = ("user_id", "item_id", "rating", "timestamp", "position", "split", "user_key", "item_key")
# Items: item_id and any of these.
ITEM_COLUMNS = ("item_id", "title", "brand", "categories", "description", "text", "image_url", "item_key")


@dataclass
class RawData:
    interactions: pl.DataFrame
    items: pl.DataFrame | None = None
    reports: list[ParseReport] = field(default_factory=list)
    # Precomputed feature matrices shipped with the data (MMRec: image_feat.npy, text_feat.npy),
    # rows in item_key order.
    precomputed: dict[str, Path] = field(default_factory=dict)
