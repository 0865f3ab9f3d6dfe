"""``diffcl graphs``: build and save the interaction graph and the frozen item-item graphs.

Saved under ``graphs/`` as scipy ``.npz`` files, each with a JSON sidecar recording what it was
built from (hash of the prepared interactions or of the feature file, and the settings), so that a
later stage can tell a current graph from a stale one.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from diffcl.core.config import PipelineConfig
from diffcl.core.feature_files import available_features, model_feature_files, read_item_features
from diffcl.core.io import open_input, open_output, sha256_file, sidecar
from diffcl.core.workspace import DatasetDirs
from diffcl.data import InteractionData
from diffcl.graphs import fuse_item_graphs, fusion_weights, knn_graph, normalized_adjacency

log = logging.getLogger(__name__)


def save_graph(path: str | Path, matrix: sp.spmatrix, provenance: dict[str, Any]) -> None:
    """The graph and its JSON sidecar, at a local path or an fsspec URL (a shared workspace)."""
    with open_output(path) as handle:
        sp.save_npz(handle, sp.csr_matrix(matrix))
    with open_output(sidecar(path, ".json")) as handle:
        handle.write((json.dumps(provenance, indent=2, default=str) + "\n").encode())


def load_graph(path: str | Path) -> sp.csr_matrix:
    with open_input(path) as handle:
        return sp.load_npz(handle).tocsr()


def modality_knn(dirs: DatasetDirs, modality: str, features: np.ndarray, features_path: Path, k: int,
                 chunk: int, ann_above: int | None = None) -> tuple[sp.csr_matrix, bool]:
    """The kNN graph of one modality: loaded when ``graphs/knn_<modality>.npz`` was built from the
    same feature file with the same k (and backend), else built and saved. Returns (graph, built)."""
    path = dirs.graphs / f"knn_{modality}.npz"
    provenance = {"kind": f"{modality} cosine kNN", "k": k, "features_sha256": sha256_file(features_path)}
    approximate = ann_above is not None and len(features) > ann_above
    if approximate:  # only then: exact graphs saved before this key existed stay current
        provenance["backend"] = "faiss-hnsw"
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists() and json.loads(meta.read_text()) == provenance:
        return load_graph(path), False
    graph = knn_graph(features, k, chunk, ann_above=ann_above)
    save_graph(path, graph, provenance)
    return graph, True


def build_graphs(config: PipelineConfig) -> dict[str, Any]:
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    if not (dirs.prepared / "interactions.parquet").exists():
        raise FileNotFoundError(f"no prepared data in {dirs.prepared}; run `diffcl prepare` first")
    gc = config.graphs
    report: dict[str, Any] = {"graphs": {}}
    start = time.perf_counter()
    data = InteractionData.load(dirs.prepared)
    adjacency = normalized_adjacency(data.train)
    save_graph(dirs.graphs / "adjacency.npz", adjacency,
               {"kind": "normalized bipartite adjacency (train split)", "interactions_sha256": data.source_hash,
                "users": data.n_users, "items": data.n_items})
    report["graphs"]["adjacency"] = {"nodes": adjacency.shape[0], "edges": adjacency.nnz,
                                     "seconds": round(time.perf_counter() - start, 3)}

    knn: dict[str, sp.csr_matrix] = {}
    model_feature_files(config, dirs.features)  # the configured model's modalities must be there
    features = available_features(dirs.features)
    for modality, path in features.items():
        start = time.perf_counter()
        matrix, _ = read_item_features(path, data.n_items)
        knn[modality], _ = modality_knn(dirs, modality, matrix, path, gc.knn_k, gc.chunk_items, gc.ann_above)
        report["graphs"][f"knn_{modality}"] = {"items": data.n_items, "edges": knn[modality].nnz,
                                               "seconds": round(time.perf_counter() - start, 3)}
    if not features:
        log.info("no modality features in %s: no item graph is built", dirs.features)
    fused = fuse_item_graphs(knn, gc.modality_weights)
    if fused is not None:
        weights = fusion_weights(list(knn), gc.modality_weights)
        save_graph(dirs.graphs / "item_item.npz", fused,
                   {"kind": "fused item-item graph", "modalities": sorted(knn), "weights": weights, "k": gc.knn_k})
        report["graphs"]["item_item"] = {"items": data.n_items, "edges": fused.nnz, "modalities": sorted(knn)}
    report["dir"] = str(dirs.graphs)
    return report
