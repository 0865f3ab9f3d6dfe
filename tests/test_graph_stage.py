import json

import numpy as np
import scipy.sparse as sp

from diffcl.core.feature_files import read_features, read_metadata, write_features
from diffcl.core.workspace import DatasetDirs
from pipeline.graphs import build_graphs, load_graph


def test_feature_store_round_trip_is_exact(tmp_path):
    matrix = np.random.default_rng(0).normal(size=(17, 5)).astype(np.float32)
    write_features(tmp_path / "text.parquet", matrix, {"encoder": "test"})
    back, meta = read_features(tmp_path / "text.parquet")
    assert back.dtype == np.float32 and np.array_equal(back, matrix)
    assert meta["encoder"] == "test" and meta["dim"] == 5
    assert read_metadata(tmp_path / "text.parquet")["items"] == 17


def test_graph_stage_builds_every_available_modality(demo_workspace):
    config = demo_workspace("graphs.knn_k=4")
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    n_items = len(__import__("polars").read_parquet(dirs.prepared / "items.parquet"))
    rng = np.random.default_rng(1)
    write_features(dirs.features / "text.parquet", rng.normal(size=(n_items, 8)))
    write_features(dirs.features / "image.parquet", rng.normal(size=(n_items, 6)))
    try:
        report = build_graphs(config)
        assert set(report["graphs"]) == {"adjacency", "knn_image", "knn_text", "item_item"}
        fused = load_graph(dirs.graphs / "item_item.npz")
        text = load_graph(dirs.graphs / "knn_text.npz")
        image = load_graph(dirs.graphs / "knn_image.npz")
        np.testing.assert_allclose(fused.toarray(), (0.1 * image + 0.9 * text).toarray(), rtol=1e-6)
        assert isinstance(fused, sp.csr_matrix) and text.nnz == n_items * 4
        provenance = json.loads((dirs.graphs / "adjacency.json").read_text())
        assert len(provenance["interactions_sha256"]) == 64
    finally:
        for name in ("text.parquet", "image.parquet"):
            (dirs.features / name).unlink()
