"""``diffcl graphs``: the frozen kNN item graph of every modality with features, the one producer of
``graphs/knn_<modality>.npz`` (see :mod:`diffcl.graph_files`). A graph already built from the same
feature file and settings is kept."""

from __future__ import annotations

import logging
import time
from typing import Any

import polars as pl

from diffcl.core.config import PipelineConfig
from diffcl.core.feature_files import available_features, model_feature_files, read_item_features
from diffcl.core.prepared import verify_prepared
from diffcl.core.workspace import DatasetDirs
from diffcl.graph_files import is_current, knn_path, knn_provenance, load_graph, save_graph
from diffcl.graphs import knn_graph

log = logging.getLogger(__name__)


def build_graphs(config: PipelineConfig) -> dict[str, Any]:
    """Build the missing or stale kNN graphs; a report per graph (items, edges, seconds, built)."""
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    tables = verify_prepared(dirs.prepared)  # the whole set: a mixed one is refused at every stage
    n_items = pl.scan_parquet(dirs.prepared / "items.parquet").select(pl.len()).collect().item()
    gc = config.graphs
    model_feature_files(config, dirs.features)  # the configured model's modalities must be there
    features = available_features(dirs.features)
    if not features:
        log.info("no modality features in %s: no kNN graph to build", dirs.features)
    report: dict[str, Any] = {"graphs": {}, "dir": str(dirs.graphs), "items_sha256": tables["items.parquet"]}
    for modality, path in features.items():
        start = time.perf_counter()
        target = knn_path(dirs.graphs, modality)
        provenance = knn_provenance(modality, path, gc.knn_k, n_items, gc.ann_above)
        built = not is_current(target, provenance)
        if built:
            matrix, _ = read_item_features(path, n_items)
            graph = knn_graph(matrix, gc.knn_k, gc.chunk_items, ann_above=gc.ann_above)
            save_graph(target, graph, provenance)
        else:
            graph = load_graph(target)
        report["graphs"][f"knn_{modality}"] = {"items": n_items, "edges": graph.nnz, "built": built,
                                               "seconds": round(time.perf_counter() - start, 3)}
    return report

