"""Interaction filtering (dedup, rating threshold, iterative k-core) and the train/valid/test split.

All of it is vectorised polars: no Python loop per user or per interaction.
"""

from __future__ import annotations

import numpy as np
import polars as pl

SPLITS = ("train", "valid", "test")
SplitEnum = pl.Enum(list(SPLITS))


def deduplicate(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per (user, item): the latest where timestamps exist, else the first seen.

    A shipped split is kept with the row that survives.
    """
    if "timestamp" in frame.columns:
        frame = frame.sort("timestamp", nulls_last=True, maintain_order=True)
        return frame.unique(["user_id", "item_id"], keep="last", maintain_order=True)
    return frame.unique(["user_id", "item_id"], keep="first", maintain_order=True)


def kcore(frame: pl.DataFrame, k: int, user: str = "user_id", item: str = "item_id") -> pl.DataFrame:
    """Iterative k-core: drop users and items with fewer than k interactions until none is left."""
    if k <= 1:
        return frame
    while True:
        before = frame.height
        frame = frame.filter(
            (pl.len().over(user) >= k) & (pl.len().over(item) >= k)
        )
        # One pass may leave a row whose counts dropped below k through the other side.
        frame = frame.filter((pl.len().over(user) >= k) & (pl.len().over(item) >= k))
        if frame.height == before:
            return frame


def assign_split(
    frame: pl.DataFrame,
    *,
    ratios: tuple[float, float, float],
    seed: int,
    order: str | None = None,
) -> pl.DataFrame:
    """Per-user split of ``frame`` (integer ``user`` column) into train / valid / test.

    Random (``order=None``): each user's interactions in a seeded random order. Chronological:
    ordered by the ``order`` column (timestamp or position), ties broken at random. Users with at
    least 10 interactions give round(n * ratio) (at least 1) to valid and to test, the last ones in
    that order; users with fewer keep all but the last two in train and give one to each.
    """
    rng = np.random.default_rng(seed)
    frame = frame.with_columns(pl.Series("_noise", rng.random(frame.height)))
    sort_cols = ["user", order, "_noise"] if order else ["user", "_noise"]
    frame = frame.sort(sort_cols)
    _, r_valid, r_test = ratios
    n = pl.len().over("user")
    few = n < 10
    n_valid = pl.when(few).then(1).otherwise((n * r_valid).round().cast(pl.Int64).clip(lower_bound=1))
    n_test = pl.when(few).then(1).otherwise((n * r_test).round().cast(pl.Int64).clip(lower_bound=1))
    pos = pl.int_range(pl.len()).over("user")
    split = (
        pl.when(pos >= n - n_test)
        .then(pl.lit("test"))
        .when(pos >= n - n_test - n_valid)
        .then(pl.lit("valid"))
        .otherwise(pl.lit("train"))
    )
    return frame.with_columns(split.cast(SplitEnum).alias("split")).drop("_noise")


def users_without_train(frame: pl.DataFrame) -> pl.Series:
    """The users (integer ``user`` column) none of whose interactions is in the train split."""
    per_user = frame.group_by("user").agg((pl.col("split") == "train").any().alias("has_train"))
    return per_user.filter(~pl.col("has_train")).get_column("user").sort()
