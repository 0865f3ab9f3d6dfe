"""Config of the data stages: where a dataset comes from (``dataset``), how remote sources are
fetched (``fetch``) and how they become the prepared tables (``prepare``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from diffcl.core.config.base import Strict

SourceKind = Literal["amazon2014", "amazon2018", "amazon2023", "mmrec", "tables"]
PRESET_NAMES = ("baby", "sports", "clothing")


class Columns(Strict):
    """Column names of plain tables (``dataset.source: tables``). Only ``user`` and ``item`` are
    required in the interactions table; every other column is used when it is named here."""

    user: str = Field("user_id", description="interactions: user identifier column")
    item: str = Field("item_id", description="interactions and items: item identifier column")
    rating: str | None = Field(None, description="interactions: explicit rating (1-5)")
    timestamp: str | None = Field(None, description="interactions: unix seconds, or a datetime")
    position: str | None = Field(
        None, description="interactions: order of the item in the user's history (oldest first)"
    )
    split: str | None = Field(
        None, description="interactions: a shipped split, values 0/1/2 or train/valid/test"
    )
    title: str | None = Field(None, description="items: title")
    brand: str | None = Field(None, description="items: brand")
    categories: str | None = Field(None, description="items: categories (list or string)")
    description: str | None = Field(None, description="items: description")
    text: str | None = Field(None, description="items: one ready-made text for the item")
    image_url: str | None = Field(None, description="items: image URL or path")


# Where a dataset's files are (paths or URLs): not what they hold, so no cache key includes them.
DATASET_LOCATION_FIELDS = ("reviews", "meta", "path", "interactions", "items")


class DatasetConfig(Strict):
    """Where a dataset comes from. Sources are URLs (http, https, file) or local paths, plain or
    gzip; URLs are fetched into ``<workspace>/<name>/raw/``, local paths are read in place."""

    name: str = Field(description="folder name under the workspace; required")
    source: SourceKind | None = Field(
        None, description="input form; required unless a preset implies it"
    )
    preset: Literal[PRESET_NAMES] | None = Field(
        None,
        description="a benchmark dataset of the field (the 2014 5-core dumps behind MMRec's Baby, "
        "Sports, Clothing): implies source amazon2014 and its published reviews and meta URLs",
    )
    category: str | None = Field(
        None,
        description="amazon2018 / amazon2023: a category name (e.g. Industrial_and_Scientific) "
        "whose published dump URLs fill in reviews and meta",
    )
    reviews: str | None = Field(None, description="raw dumps: reviews file, URL or path")
    meta: str | None = Field(None, description="raw dumps: metadata file, URL or path (optional)")
    path: str | None = Field(None, description="mmrec: the dataset folder")
    interactions: str | None = Field(None, description="tables: interactions file")
    items: str | None = Field(None, description="tables: items file (optional)")
    format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = Field(
        "auto", description="tables: file format; auto goes by the file name"
    )
    columns: Columns = Field(default_factory=Columns, description="tables: column names")

    @model_validator(mode="after")
    def _check_inputs(self) -> DatasetConfig:
        if self.preset is not None:
            if self.source not in (None, "amazon2014"):
                raise ValueError(f"preset {self.preset!r} is an amazon2014 dataset, not {self.source!r}")
            self.source = "amazon2014"
        if self.source is None:
            raise ValueError("dataset.source is required (amazon2014 | amazon2018 | amazon2023 | mmrec | tables)")
        if self.category is not None and self.source not in ("amazon2018", "amazon2023"):
            raise ValueError("dataset.category names a category of the amazon2018 or amazon2023 dumps")
        need = {
            "mmrec": ["path"],
            "tables": ["interactions"],
            "amazon2014": ["reviews"],
            "amazon2018": ["reviews"],
            "amazon2023": ["reviews"],
        }[self.source]
        missing = [key for key in need if getattr(self, key) is None]
        if missing == ["reviews"] and (self.preset or self.category):
            missing = []
        if missing:
            hint = " (or dataset.preset / dataset.category)" if self.source != "mmrec" else ""
            raise ValueError(
                f"source {self.source!r} needs dataset.{', dataset.'.join(missing)}{hint}"
            )
        return self


class FetchConfig(Strict):
    """Downloads of remote sources."""

    timeout_s: float = Field(60.0, gt=0, description="connect/read timeout per request, seconds")
    retries: int = Field(5, ge=0, description="further attempts after a failed one")
    backoff_s: float = Field(
        1.0, ge=0, description="first retry delay; doubles each attempt (exponential backoff)"
    )
    max_backoff_s: float = Field(60.0, ge=0, description="cap on one retry delay, seconds")
    check_remote: bool = Field(
        True,
        description="ask the server whether a fetched file changed (conditional request); "
        "false trusts the local copy",
    )
    offline_ok: bool = Field(
        False,
        description="when a server stays unreachable (after the retries) and raw/ holds a copy that "
        "matches its manifest, go on with that copy (a warning says so); false: the run fails",
    )


class PrepareConfig(Strict):
    """Parsing, filtering and splitting into the prepared tables."""

    min_rating: float | None = Field(
        None, description="keep interactions with rating >= this; null keeps all"
    )
    kcore: int | None = Field(
        None, ge=1,
        description="iterative k-core: users and items with >= k interactions. null (auto): no filtering when "
        "the dataset's shipped split is used (a published benchmark is taken as published), else 5 (raw dumps, "
        "tables without a split). An explicit number always applies. Users left without a training "
        "interaction are dropped, as MMRec does, and counted in stats.json (cold_start_users)",
    )
    split: Literal["auto", "random", "chronological"] = Field(
        "auto",
        description="auto: the dataset's own split where it ships one, else random; "
        "chronological needs timestamps or positions",
    )
    ratios: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/valid/test shares for random and chronological splits"
    )
    seed: int = Field(2024, description="seed of the random split (and of the held-out items)")
    held_out_items: float = Field(
        0.0, ge=0, lt=1,
        description="new-item (cold-start) protocol: this share of the interacted items, drawn with prepare.seed, "
        "has every interaction moved out of train, the first half of them into valid and the rest into test, so "
        "they are new to the model; pair with train.negatives trained_items so that training never sees them, and "
        "read cold_recall@K / cold_ndcg@K. 0: none held out (the usual protocol)",
    )
    max_bad_share: float = Field(
        0.01, ge=0, le=1, description="fail when more than this share of input lines is malformed"
    )

    @model_validator(mode="after")
    def _check_ratios(self) -> PrepareConfig:
        if any(r <= 0 for r in self.ratios) or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ValueError(f"prepare.ratios must be three positive shares summing to 1, got {self.ratios}")
        return self
