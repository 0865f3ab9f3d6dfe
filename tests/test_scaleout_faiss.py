"""The approximate (FAISS) kNN backend: recall against the exact graph, and the same output format."""

from __future__ import annotations

import numpy as np
import pytest

from diffcl.ann import faiss_knn_graph, knn_recall
from diffcl.graphs import knn_graph

pytest.importorskip("faiss")


def clustered(n: int = 3000, d: int = 32, clusters: int = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    return (centres[rng.integers(clusters, size=n)] + 0.3 * rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("include_self", [True, False])
def test_faiss_knn_recall_and_format_match_exact(include_self):
    x = clustered()
    exact = knn_graph(x, k=10, include_self=include_self)
    approx = knn_graph(x, k=10, include_self=include_self, ann_above=1000)  # 3000 items: the ANN path
    assert approx.shape == exact.shape and approx.dtype == exact.dtype and approx.has_sorted_indices
    assert np.array_equal(np.diff(approx.indptr), np.full(len(x), 10))
    assert np.allclose(approx.data, 0.1)
    diagonal = approx.diagonal()
    assert (diagonal > 0).all() if include_self else (diagonal == 0).all()
    assert knn_recall(x, approx, k=10, sample=500, include_self=include_self) >= 0.9
    assert knn_recall(x, exact, k=10, sample=500, include_self=include_self) == pytest.approx(1.0, abs=0.01)


def test_faiss_knn_below_threshold_is_exact_and_tiny_catalogues():
    x = clustered(n=200)
    assert (knn_graph(x, k=5, ann_above=200) != knn_graph(x, k=5)).nnz == 0  # not above: exact
    tiny = faiss_knn_graph(x[:4], k=10, include_self=False)
    assert np.array_equal(np.diff(tiny.indptr), np.full(4, 3)) and tiny.diagonal().sum() == 0
