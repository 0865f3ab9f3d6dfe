"""The real data in ../shared/data (opt in: pytest -m realdata; skipped when absent)."""

import polars as pl
import pytest

from diffcl.core.config import load_config
from features.readers.amazon import read_amazon
from pipeline.prepare import prepare
from tests.conftest import shared_data

pytestmark = pytest.mark.realdata


def test_baby_mmrec_counts_and_shipped_split(tmp_path):
    folder = shared_data("amazon-baby")
    cfg = load_config({"workspace": str(tmp_path), "dataset": {"name": "baby", "source": "mmrec", "path": str(folder)}})
    stats = prepare(cfg, progress=False).stats
    assert (stats["users"], stats["items"], stats["interactions"]) == (19445, 7050, 160792)
    assert (stats["train"], stats["valid"], stats["test"]) == (119674, 20559, 20559)
    assert stats["split"] == "shipped"


def test_scientific_tables_have_text(tmp_path):
    folder = shared_data("amazon-scientific")
    cfg = load_config({
        "workspace": str(tmp_path),
        "dataset": {"name": "sci", "source": "tables", "interactions": str(folder / "interactions.tsv"),
                    "items": str(folder / "items.tsv"),
                    "columns": {"user": "user_id", "item": "item_id", "position": "position", "text": "text"}},
    })
    result = prepare(cfg, progress=False)
    items = pl.read_parquet(result.outputs["items"])
    assert items.get_column("text").null_count() == 0 and items.height == result.stats["items"]


def test_fashion_2018_pretty_printed_records():
    path = shared_data("amazon2018-fashion5-raw") / "AMAZON_FASHION_5.json"
    raw = read_amazon("amazon2018", path, None)
    assert raw.interactions.height == 3176 and raw.reports[0].bad == 0
    assert raw.interactions.get_column("item_id").n_unique() == 31
