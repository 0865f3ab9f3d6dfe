import json
import os

import polars as pl
import pytest

from diffcl.core.config import load_config
from features.records import DataError
from pipeline.prepare import prepare
from tests.httpserver import Route

STATS_KEYS = {"users", "items", "interactions", "train", "valid", "test"}


def _config(tmp_path, dataset, **prepare_kw):
    return load_config({"workspace": str(tmp_path / "ws"), "dataset": dataset, "prepare": prepare_kw})


def test_demo_data_end_to_end(tmp_path, demo_source):
    cfg = _config(tmp_path, {"name": "demo", "source": "amazon2018", "reviews": str(demo_source["reviews"]),
                             "meta": str(demo_source["meta"])})
    result = prepare(cfg, progress=False)
    stats = json.loads(result.outputs["stats"].read_text())
    assert set(stats) >= STATS_KEYS
    assert stats["train"] + stats["valid"] + stats["test"] == stats["interactions"]
    inter = pl.read_parquet(result.outputs["interactions"])
    items = pl.read_parquet(result.outputs["items"])
    users = pl.read_parquet(result.outputs["users"])
    # Contiguous ids, every user in every split, every item with text and an image URL.
    assert inter.get_column("user").n_unique() == users.height == stats["users"]
    assert sorted(items.get_column("item").to_list()) == list(range(stats["items"]))
    assert inter.group_by("user").agg(pl.col("split").n_unique()).get_column("split").min() == 3
    assert items.get_column("text").null_count() == 0
    assert items.get_column("image_url").null_count() == 0
    assert "<p>" not in " ".join(items.get_column("text").to_list())
    assert {"rating", "timestamp"} <= set(inter.columns)
    # k-core holds on the result.
    assert inter.group_by("user").len().get_column("len").min() >= 5
    assert inter.group_by("item").len().get_column("len").min() >= 5
    # Nothing temporary left behind.
    assert not [p for p in os.listdir(result.dirs.prepared) if p.endswith(".tmp")]


def test_same_seed_same_output(tmp_path, demo_source):
    ds = {"name": "demo", "source": "amazon2018", "reviews": str(demo_source["reviews"])}
    a = pl.read_parquet(prepare(_config(tmp_path / "a", ds), progress=False).outputs["interactions"])
    b = pl.read_parquet(prepare(_config(tmp_path / "b", ds), progress=False).outputs["interactions"])
    assert a.equals(b)


def test_remote_sources_are_fetched_into_raw(tmp_path, demo_source, http_server):
    http_server.routes["/Demo_5.json.gz"] = Route(demo_source["reviews"].read_bytes())
    http_server.routes["/meta_Demo.json.gz"] = Route(demo_source["meta"].read_bytes())
    cfg = _config(tmp_path, {"name": "demo", "source": "amazon2018", "reviews": http_server.url("/Demo_5.json.gz"),
                             "meta": http_server.url("/meta_Demo.json.gz")})
    result = prepare(cfg, progress=False)
    assert (result.dirs.raw / "Demo_5.json.gz").exists()
    assert (result.dirs.raw / "Demo_5.json.gz.manifest.json").exists()
    assert result.stats["inputs"]["reviews"]["url"] == http_server.url("/Demo_5.json.gz")
    hits = dict(http_server.hits)
    prepare(cfg, progress=False)  # second run: conditional requests, no new downloads
    assert http_server.requests[-1][1].get("If-None-Match")
    assert all(http_server.hits[k] == hits[k] + 1 for k in hits)


def test_file_urls_are_read_in_place(tmp_path, demo_source):
    cfg = _config(tmp_path, {"name": "demo", "source": "amazon2018", "reviews": demo_source["reviews"].as_uri()})
    result = prepare(cfg, progress=False)
    assert result.stats["users"] > 0 and not result.dirs.raw.exists()


def test_empty_after_filtering_is_a_clear_error(tmp_path, demo_source):
    cfg = _config(tmp_path, {"name": "demo", "source": "amazon2018", "reviews": str(demo_source["reviews"])}, kcore=500)
    with pytest.raises(DataError, match="no interactions left after filtering.*kcore=500"):
        prepare(cfg, progress=False)


def test_min_rating_filters(tmp_path, demo_source):
    ds = {"name": "demo", "source": "amazon2018", "reviews": str(demo_source["reviews"])}
    all_rows = prepare(_config(tmp_path / "a", ds, kcore=3), progress=False).stats["interactions"]
    high = prepare(_config(tmp_path / "b", ds, kcore=3, min_rating=5), progress=False)
    inter = pl.read_parquet(high.outputs["interactions"])
    assert 0 < inter.height < all_rows and inter.get_column("rating").min() == 5.0


def test_missing_file_names_the_key(tmp_path):
    cfg = _config(tmp_path, {"name": "x", "source": "amazon2018", "reviews": str(tmp_path / "nope.json.gz")})
    with pytest.raises(DataError, match=r"dataset\.reviews: file not found: .*nope\.json\.gz"):
        prepare(cfg, progress=False)


def test_failed_run_keeps_previous_outputs_intact(tmp_path, demo_source, monkeypatch):
    ds = {"name": "demo", "source": "amazon2018", "reviews": str(demo_source["reviews"])}
    result = prepare(_config(tmp_path, ds), progress=False)
    before = result.outputs["interactions"].read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pl.DataFrame, "write_parquet", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(_config(tmp_path, ds, seed=99), progress=False)
    assert result.outputs["interactions"].read_bytes() == before
    assert not [p for p in os.listdir(result.dirs.prepared) if p.endswith(".tmp")]


def test_mmrec_ids_and_feature_rows_survive(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    rows = ["userID\titemID\tx_label"]
    for u in range(6):
        for i in range(6):
            rows.append(f"{u}\t{i}\t{0 if i < 4 else (1 if i == 4 else 2)}")
    (folder / "toy.inter").write_text("\n".join(rows) + "\n")
    cfg = _config(tmp_path, {"name": "toy", "source": "mmrec", "path": str(folder)})
    result = prepare(cfg, progress=False)
    items = pl.read_parquet(result.outputs["items"])
    assert items.get_column("item").to_list() == items.get_column("source_row").to_list()
    assert result.stats["split"] == "shipped" and result.stats["valid"] == 6
