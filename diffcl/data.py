"""The prepared interactions as the model library needs them: train pairs and per-user item sets.

Read once from ``prepared/interactions.parquet`` (the data stage's output); everything else (the
sampler, the graphs, the evaluator) takes an :class:`InteractionData`.

Reading checks the tables against ``stats.json`` (:func:`diffcl.core.prepared.verify_prepared`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from diffcl.core.prepared import verify_prepared


@dataclass(frozen=True)
class InteractionData:
    n_users: int
    n_items: int
    train: sp.csr_matrix  # users x items, binary
    valid: sp.csr_matrix
    test: sp.csr_matrix
    source_hash: str = ""  # sha256 of the interactions file, for provenance

    @functools.cached_property
    def item_degrees(self) -> np.ndarray:
        """Each item's number of training interactions (float64, one entry per item)."""
        return np.asarray(self.train.sum(axis=0), dtype=np.float64).ravel()

    @functools.cached_property
    def new_items(self) -> np.ndarray:
        """The items without a training interaction (new to the model: the cold-start protocol's)."""
        return np.flatnonzero(self.item_degrees == 0)

    @property
    def train_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        coo = self.train.tocoo()
        return coo.row.astype(np.int64), coo.col.astype(np.int64)

    @classmethod
    def from_frame(cls, frame: pl.DataFrame, n_users: int | None = None, n_items: int | None = None,
                   source_hash: str = "") -> InteractionData:
        n_users = n_users if n_users is not None else int(frame.get_column("user").max()) + 1
        n_items = n_items if n_items is not None else int(frame.get_column("item").max()) + 1

        def matrix(split: str) -> sp.csr_matrix:
            part = frame.filter(pl.col("split") == split)
            rows = part.get_column("user").to_numpy()
            cols = part.get_column("item").to_numpy()
            m = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n_users, n_items))
            m.sum_duplicates()
            m.data[:] = 1.0
            return m

        return cls(n_users, n_items, matrix("train"), matrix("valid"), matrix("test"), source_hash)

    @classmethod
    def load(cls, prepared: Path) -> InteractionData:
        prepared = Path(prepared)
        hashes = verify_prepared(prepared)
        frame = pl.read_parquet(prepared / "interactions.parquet", columns=["user", "item", "split"])
        n_users = pl.scan_parquet(prepared / "users.parquet").select(pl.len()).collect().item()
        n_items = pl.scan_parquet(prepared / "items.parquet").select(pl.len()).collect().item()
        return cls.from_frame(frame, n_users, n_items, hashes["interactions.parquet"])
