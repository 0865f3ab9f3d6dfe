
import numpy as np
import pytest
import scipy.sparse as sp

from diffcl.core.feature_files import read_features, read_metadata, write_features
from diffcl.core.workspace import DatasetDirs
from diffcl.graph_files import load_graph
from diffcl.training.errors import TrainError
from diffcl.training.run import build_run
from pipeline.graphs import build_graphs


def test_feature_store_round_trip_is_exact(tmp_path):
    matrix = np.random.default_rng(0).normal(size=(17, 5)).astype(np.float32)
    write_features(tmp_path / "text.parquet", matrix, {"encoder": "test"})
    back, meta = read_features(tmp_path / "text.parquet")
    assert back.dtype == np.float32 and np.array_equal(back, matrix)
    assert meta["encoder"] == "test" and meta["dim"] == 5
    assert read_metadata(tmp_path / "text.parquet")["items"] == 17


def test_graph_stage_is_the_one_producer_training_loads_and_refuses_stale(demo_workspace):
    config = demo_workspace("graphs.knn_k=4", "model.name=freedom", "train.epochs=1")
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    n_items = len(__import__("polars").read_parquet(dirs.prepared / "items.parquet"))
    rng = np.random.default_rng(1)
    write_features(dirs.features / "text.parquet", rng.normal(size=(n_items, 8)))
    write_features(dirs.features / "image.parquet", rng.normal(size=(n_items, 6)))
    try:
        report = build_graphs(config)
        assert set(report["graphs"]) == {"knn_image", "knn_text"}  # Â and S are not files
        assert all(info["built"] and info["edges"] == n_items * 4 for info in report["graphs"].values())
        text = load_graph(dirs.graphs / "knn_text.npz")
        assert isinstance(text, sp.csr_matrix) and text.nnz == n_items * 4
        assert not any(info["built"] for info in build_graphs(config)["graphs"].values())  # current: kept
        trainer = build_run(config)
        assert trainer.model.modalities == ["image", "text"] and trainer.model.item_graph is not None

        # New text features: the graph no longer matches them, and training says what to run.
        write_features(dirs.features / "text.parquet", rng.normal(size=(n_items, 8)))
        with pytest.raises(TrainError, match=r"knn_text\.npz was built from other text features.*`diffcl graphs CONFIG`"):
            build_run(config)
        with pytest.raises(TrainError, match=r"knn_\w+\.npz was built from other \w+ features or graphs settings"):
            build_run(demo_workspace("graphs.knn_k=5", "model.name=freedom"))
        assert build_graphs(config)["graphs"]["knn_text"]["built"]
        build_run(config)
    finally:
        for name in ("text.parquet", "image.parquet", "knn_text.npz", "knn_text.json", "knn_image.npz", "knn_image.json"):
            for folder in (dirs.features, dirs.graphs):
                (folder / name).unlink(missing_ok=True)
