"""The frozen kNN item graphs on disk: ``graphs/knn_<modality>.npz`` with a JSON sidecar saying what
each was built from (the feature file's sha256, k, the backend).

The graphs stage (:mod:`pipeline.graphs`) is their one producer; training loads them and refuses a
missing or stale one with the command that rebuilds it. The interaction graph Â and the fused item
graph S are not files: the model context derives them (cheaply) from the training split and these
graphs (:class:`diffcl.models.ModelContext`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import scipy.sparse as sp

from diffcl.core.io import open_input, open_output, sha256_file, sidecar


class GraphFileError(ValueError):
    """A kNN graph that training needs is missing or was built from other features or settings."""


def knn_path(graphs_dir: Path, modality: str) -> Path:
    return Path(graphs_dir) / f"knn_{modality}.npz"


def knn_provenance(modality: str, features_path: Path, k: int, n_items: int, ann_above: int | None) -> dict[str, Any]:
    """What a current graph's sidecar records. The backend is named only when approximate, so that
    exact graphs saved before the key existed stay current."""
    provenance: dict[str, Any] = {"kind": f"{modality} cosine kNN", "k": k, "features_sha256": sha256_file(features_path)}
    if ann_above is not None and n_items > ann_above:
        provenance["backend"] = "faiss-hnsw"
    return provenance


def is_current(path: Path, provenance: dict[str, Any]) -> bool:
    meta = sidecar(path, ".json")
    return Path(path).exists() and Path(meta).exists() and json.loads(Path(meta).read_text()) == provenance


def save_graph(path: str | Path, matrix: sp.spmatrix, provenance: dict[str, Any]) -> None:
    """The graph and its JSON sidecar, at a local path or an fsspec URL (a shared workspace)."""
    with open_output(path) as handle:
        sp.save_npz(handle, sp.csr_matrix(matrix))
    with open_output(sidecar(path, ".json")) as handle:
        handle.write((json.dumps(provenance, indent=2, default=str) + "\n").encode())


def load_graph(path: str | Path) -> sp.csr_matrix:
    with open_input(path) as handle:
        return sp.load_npz(handle).tocsr()


def load_knn_graph(graphs_dir: Path, modality: str, features_path: Path, k: int, n_items: int,
                   ann_above: int | None) -> sp.csr_matrix:
    """The modality's kNN graph, refused when missing or built from other features or settings."""
    path = knn_path(graphs_dir, modality)
    if not path.exists():
        raise GraphFileError(f"{path} is missing: build the {modality} kNN graph with `diffcl graphs CONFIG`")
    if not is_current(path, knn_provenance(modality, features_path, k, n_items, ann_above)):
        raise GraphFileError(f"{path} was built from other {modality} features or graphs settings than "
                             f"{features_path} and graphs.knn_k {k}; rebuild it with `diffcl graphs CONFIG`")
    return load_graph(path)
