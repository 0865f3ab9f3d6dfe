"""The prepared interactions as the model library needs them: train pairs and per-user item sets.

Read once from ``prepared/interactions.parquet`` (the data stage's output); everything else (the
sampler, the graphs, the evaluator) takes an :class:`InteractionData`.

The prepared tables are one set: ``stats.json``, written last, records the sha256 of each, and
every reader checks the tables it reads against it (:func:`verify_prepared`), so that a data stage
killed between two renames never passes for a finished one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp

from diffcl.io import sha256_file

PREPARED_TABLES = ("interactions.parquet", "items.parquet", "users.parquet")


class PreparedDataError(ValueError):
    """Prepared tables that are missing, or not the set that ``stats.json`` describes."""


def table_hashes(prepared: Path, names: tuple[str, ...] = PREPARED_TABLES) -> dict[str, str]:
    """sha256 of each named table: what ``stats.json`` records under ``tables``."""
    return {name: sha256_file(Path(prepared) / name) for name in names}


def verify_prepared(prepared: Path, names: tuple[str, ...] = PREPARED_TABLES) -> dict[str, str]:
    """The hashes of the named tables, checked against ``stats.json``; raises PreparedDataError
    naming the first table that is missing or differs."""
    prepared = Path(prepared)
    rerun = "rerun `diffcl prepare`"
    stats_path = prepared / "stats.json"
    try:
        recorded = json.loads(stats_path.read_text(encoding="utf-8")).get("tables")
    except FileNotFoundError:
        raise PreparedDataError(f"no prepared data in {prepared} ({stats_path.name} is missing); {rerun}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise PreparedDataError(f"{stats_path}: unreadable ({err}); {rerun}") from None
    if not isinstance(recorded, dict):
        raise PreparedDataError(f"{stats_path} records no table hashes (an older data stage wrote it); {rerun}")
    hashes = {}
    for name in names:
        path = prepared / name
        if not path.exists():
            raise PreparedDataError(f"{path} is missing; {rerun}")
        hashes[name] = sha256_file(path)
        if hashes[name] != recorded.get(name):
            raise PreparedDataError(f"{path} is not the table {stats_path.name} describes (an interrupted or "
                                    f"concurrent `diffcl prepare` left a mixed set); {rerun}")
    return hashes


@dataclass(frozen=True)
class InteractionData:
    n_users: int
    n_items: int
    train: sp.csr_matrix  # users x items, binary
    valid: sp.csr_matrix
    test: sp.csr_matrix
    source_hash: str = ""  # sha256 of the interactions file, for provenance

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
