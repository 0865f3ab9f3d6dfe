"""Each reader on small fixture files written here in the real formats."""

import gzip
import json

import numpy as np
import polars as pl
import pytest

from diffcl.core.config import Columns
from features.readers.amazon import read_amazon
from features.readers.mmrec import read_mmrec
from features.readers.tables import read_tables
from features.records import DataError, ParseReport, iter_records


def _write_lines(path, lines, gz=True):
    data = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(data)
    else:
        path.write_text(data)
    return path


def test_amazon2014_reviews_and_python_literal_meta(tmp_path):
    reviews = _write_lines(tmp_path / "reviews_Baby_5.json.gz", [
        json.dumps({"reviewerID": "U1", "asin": "A1", "reviewerName": "x", "helpful": [0, 0],
                    "reviewText": "ok", "overall": 5.0, "summary": "s", "unixReviewTime": 1252800000,
                    "reviewTime": "09 13, 2009"}),
        json.dumps({"reviewerID": "U2", "asin": "A2", "overall": 3.0, "unixReviewTime": 1252900000}),
    ])
    meta = _write_lines(tmp_path / "meta_Baby.json.gz", [
        str({"asin": "A1", "title": "Bottle 'Deluxe'", "price": 3.5, "imUrl": "http://img/a1.jpg",
             "related": {"also_bought": ["A2"]}, "salesRank": {"Baby": 12}, "brand": "Acme",
             "categories": [["Baby", "Feeding", "Bottles"], ["Baby", "Gifts"]],
             "description": "A bottle."}),
        str({"asin": "A2", "title": "Crib", "categories": [["Baby", "Nursery"]]}),
        str({"asin": "A9", "title": "not reviewed"}),
    ])
    raw = read_amazon("amazon2014", reviews, meta)
    inter = raw.interactions.sort("user_id")
    assert inter.get_column("item_id").to_list() == ["A1", "A2"]
    assert inter.get_column("rating").to_list() == [5.0, 3.0]
    assert inter.get_column("timestamp").to_list() == [1252800000, 1252900000]
    items = raw.items.sort("item_id")
    assert items.get_column("item_id").to_list() == ["A1", "A2"]  # only reviewed items are kept
    a1 = items.row(0, named=True)
    assert a1["title"] == "Bottle 'Deluxe'"
    assert a1["brand"] == "Acme"
    assert a1["categories"] == ["Baby", "Feeding", "Bottles"]  # the first category path
    assert a1["image_url"] == "http://img/a1.jpg"
    assert all(r.bad == 0 for r in raw.reports)


def test_literal_meta_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    meta = _write_lines(tmp_path / "meta.json", [
        str({"asin": "A1", "title": "ok"}),
        f"__import__('pathlib').Path({str(marker)!r}).touch()",
    ], gz=False)
    report = ParseReport(str(meta))
    records = list(iter_records(meta, report, allow_literal=True))
    assert [r["asin"] for r in records] == ["A1"]
    assert report.bad == 1 and not marker.exists()


def test_amazon2018_strips_html_and_picks_image(tmp_path):
    reviews = _write_lines(tmp_path / "Cat_5.json.gz", [
        json.dumps({"overall": 4.0, "verified": True, "reviewTime": "09 4, 2015", "reviewerID": "U1",
                    "asin": "A1", "style": {"Size:": " M"}, "reviewerName": "T", "reviewText": "fine",
                    "summary": "ok", "unixReviewTime": 1441324800, "vote": "2", "image": ["http://r"]}),
    ])
    meta = _write_lines(tmp_path / "meta_Cat.json.gz", [
        json.dumps({"asin": "A1", "title": "<span class='x'>Glue &amp; Tape</span>", "brand": "Gorilla",
                    "category": ["Industrial", "Tapes &amp; Adhesives"], "description": ["<p>Strong</p>", "glue"],
                    "feature": [], "imageURL": ["http://small"], "imageURLHighRes": ["http://large"]}),
    ])
    raw = read_amazon("amazon2018", reviews, meta)
    item = raw.items.row(0, named=True)
    assert item["title"] == "Glue & Tape"
    assert item["categories"] == ["Industrial", "Tapes & Adhesives"]
    assert item["description"] == "Strong glue"
    assert item["image_url"] == "http://large"


def test_amazon2023_parent_asin_milliseconds_main_image(tmp_path):
    reviews = _write_lines(tmp_path / "Cat.jsonl.gz", [
        json.dumps({"rating": 5.0, "title": "t", "text": "x", "images": [], "asin": "C1", "parent_asin": "P1",
                    "user_id": "U1", "timestamp": 1588687728923, "helpful_vote": 0, "verified_purchase": True}),
    ])
    meta = _write_lines(tmp_path / "meta_Cat.jsonl.gz", [
        json.dumps({"main_category": "All Beauty", "title": "Serum", "store": "Glow", "categories": [],
                    "description": ["Bright"], "parent_asin": "P1",
                    "images": [{"thumb": "t0", "large": "L0", "variant": "PT01", "hi_res": None},
                               {"thumb": "t1", "large": "L1", "variant": "MAIN", "hi_res": "H1"}]}),
    ])
    raw = read_amazon("amazon2023", reviews, meta)
    row = raw.interactions.row(0, named=True)
    assert row["item_id"] == "P1" and row["timestamp"] == 1588687728
    item = raw.items.row(0, named=True)
    assert item["image_url"] == "L1" and item["brand"] == "Glow" and item["categories"] == ["All Beauty"]


def test_pretty_printed_objects_are_read(tmp_path):
    objs = [{"reviewerID": f"U{i}", "asin": "A1", "overall": 5.0, "unixReviewTime": i} for i in range(3)]
    path = tmp_path / "AMAZON_FASHION_5.json"
    path.write_text("\n".join(json.dumps(o, indent=2) for o in objs) + "\n")
    raw = read_amazon("amazon2018", path, None)
    assert raw.interactions.height == 3 and raw.reports[0].bad == 0


def test_malformed_lines_are_counted_and_share_checked(tmp_path):
    good = [json.dumps({"reviewerID": f"U{i}", "asin": "A1", "overall": 5.0}) for i in range(98)]
    path = _write_lines(tmp_path / "r.json", good[:50] + ['{"reviewerID": "U', '{"asin": "A2"}'] + good[50:], gz=False)
    raw = read_amazon("amazon2018", path, None)
    report = raw.reports[0]
    assert raw.interactions.height == 98
    assert report.records == 100 and report.bad == 2 and report.first_bad_line == 51
    report.check(0.05)
    with pytest.raises(DataError, match=r"r\.json: 2 of 100 records are malformed.*line 51"):
        report.check(0.01)


def _mmrec_folder(tmp_path, with_maps=True):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy.inter").write_text("userID\titemID\trating\ttimestamp\tx_label\n"
                                      "0\t0\t5\t100\t0\n0\t1\t4\t200\t1\n1\t1\t3\t300\t2\n1\t0\t5\t400\t0\n")
    if with_maps:
        (folder / "u_id_mapping.csv").write_text("user_id\tuserID\nUA\t0\nUB\t1\n")
        (folder / "i_id_mapping.csv").write_text("asin\titemID\nIA\t0\nIB\t1\n")
    np.save(folder / "text_feat.npy", np.zeros((2, 4), dtype=np.float32))
    return folder


def test_mmrec_reader(tmp_path):
    raw = read_mmrec(_mmrec_folder(tmp_path))
    inter = raw.interactions.sort("user_key", "item_key")
    assert inter.get_column("split").to_list() == ["train", "valid", "train", "test"]
    assert inter.get_column("user_id").to_list() == ["UA", "UA", "UB", "UB"]
    assert inter.get_column("item_id").to_list() == ["IA", "IB", "IA", "IB"]
    assert set(raw.precomputed) == {"text"}


def test_mmrec_reader_without_maps_and_bad_label(tmp_path):
    folder = _mmrec_folder(tmp_path, with_maps=False)
    raw = read_mmrec(folder)
    assert raw.interactions.get_column("user_id").to_list()[0] == "0"
    (folder / "toy.inter").write_text("userID\titemID\tx_label\n0\t0\t7\n")
    with pytest.raises(DataError, match=r"toy\.inter: x_label must be 0, 1 or 2"):
        read_mmrec(folder)
    # Past the rows that type inference would look at, and a fractional id: each named with its line.
    good = "".join(f"{u}\t0\t0\n" for u in range(200))
    for bad, found in (("UA\t1\t0", "'UA'"), ("1.5\t1\t0", "'1.5'")):
        (folder / "toy.inter").write_text(f"userID\titemID\tx_label\n{good}{bad}\n")
        with pytest.raises(DataError, match=rf"toy\.inter, line 202: userID must be an integer, found {found}"):
            read_mmrec(folder)
    (folder / "toy.inter").write_text("userID\titemID\trating\tx_label\n0\t0\tfive\t0\n")
    with pytest.raises(DataError, match=r"toy\.inter, line 2: rating must be a number, found 'five'"):
        read_mmrec(folder)
    (folder / "toy.inter").write_text("userID\titemID\tx_label\n0\t0\t0\n")
    (folder / "i_id_mapping.csv").write_text("asin\titemID\nIA\t\n")
    with pytest.raises(DataError, match=r"i_id_mapping\.csv, line 2: itemID must be an integer, found an empty cell"):
        read_mmrec(folder)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet", "jsonl"])
def test_tables_in_every_format(tmp_path, fmt):
    inter = pl.DataFrame({"uid": ["a", "a", "b"], "iid": [1, 2, 1], "stars": [5, 4, 3], "when": [1, 2, 3]})
    items = pl.DataFrame({"iid": [1, 2], "name": ["One", "Two"], "pic": ["u1", None]})
    paths = {}
    for name, frame in (("inter", inter), ("items", items)):
        path = tmp_path / f"{name}.{fmt}"
        {"csv": lambda f, p: f.write_csv(p), "tsv": lambda f, p: f.write_csv(p, separator="\t"),
         "parquet": lambda f, p: f.write_parquet(p), "jsonl": lambda f, p: f.write_ndjson(p)}[fmt](frame, path)
        paths[name] = path
    cols = Columns(user="uid", item="iid", rating="stars", timestamp="when", title="name", image_url="pic")
    raw = read_tables(paths["inter"], paths["items"], cols, "auto")
    assert raw.interactions.columns == ["user_id", "item_id", "rating", "timestamp"]
    assert raw.interactions.get_column("item_id").to_list() == ["1", "2", "1"]
    assert raw.items.get_column("title").to_list() == ["One", "Two"]


def test_tables_unknown_column_names_key_and_file(tmp_path):
    path = tmp_path / "inter.csv"
    pl.DataFrame({"u": ["a"], "i": ["b"]}).write_csv(path)
    with pytest.raises(DataError, match=r"inter\.csv: unknown column\(s\) dataset\.columns\.item='item_id'"):
        read_tables(path, None, Columns(user="u"), "auto")


def test_tables_split_values(tmp_path):
    path = tmp_path / "inter.tsv"
    pl.DataFrame({"u": ["a", "a"], "i": ["x", "y"], "s": ["train", "bogus"]}).write_csv(path, separator="\t")
    with pytest.raises(DataError, match="bogus"):
        read_tables(path, None, Columns(user="u", item="i", split="s"), "auto")
