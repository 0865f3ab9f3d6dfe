"""Feature files and graphs at fsspec URLs (a workspace shared by workers on other machines),
with fsspec's memory and local filesystems."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from diffcl.core.feature_files import read_features, read_metadata, write_features
from diffcl.core.io import open_input, sidecar
from diffcl.graphs import knn_graph
from pipeline.graphs import load_graph, save_graph


@pytest.fixture(params=["memory", "file"])
def base_url(request, tmp_path) -> str:
    if request.param == "memory":
        return f"memory://diffcl-test-{tmp_path.name}/ws"
    return f"file://{tmp_path}/ws"


def test_fsspec_feature_files_and_graphs_round_trip(base_url):
    matrix = np.random.default_rng(0).standard_normal((30, 8)).astype(np.float32)
    features_url = f"{base_url}/demo/features/text.parquet"
    write_features(features_url, matrix, {"modality": "text"})
    read, meta = read_features(features_url)
    assert np.array_equal(read, matrix) and meta["modality"] == "text" and meta["dim"] == 8
    assert read_metadata(features_url)["items"] == 30

    graph = knn_graph(read, k=3)
    graph_url = f"{base_url}/demo/graphs/knn_text.npz"
    save_graph(graph_url, graph, {"kind": "text cosine kNN", "k": 3})
    assert (load_graph(graph_url) != graph).nnz == 0 and isinstance(load_graph(graph_url), sp.csr_matrix)
    with open_input(sidecar(graph_url, ".json")) as handle:
        assert b'"k": 3' in handle.read()


def test_fsspec_local_paths_keep_their_atomic_writes(tmp_path):
    path = tmp_path / "features" / "text.parquet"
    write_features(path, np.ones((2, 3), dtype=np.float32))
    assert [p.name for p in path.parent.iterdir()] == ["text.parquet"]  # no temporary left behind
    assert sidecar(path, ".json") == tmp_path / "features" / "text.json"
    assert sidecar("s3://bucket/ws.v2/graphs/knn", ".json") == "s3://bucket/ws.v2/graphs/knn.json"
