"""The on-disk layout every stage agrees on: ``<workspace>/<dataset>/{raw,prepared,...}``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DatasetDirs:
    root: Path

    @classmethod
    def of(cls, workspace: str | Path, dataset: str) -> DatasetDirs:
        return cls(Path(workspace) / dataset)

    @property
    def raw(self) -> Path:
        """Downloaded source files and their fetch manifests."""
        return self.root / "raw"

    @property
    def prepared(self) -> Path:
        """interactions / items / users Parquet tables and stats.json."""
        return self.root / "prepared"

    @property
    def features(self) -> Path:
        return self.root / "features"

    @property
    def graphs(self) -> Path:
        return self.root / "graphs"

    @property
    def runs(self) -> Path:
        return self.root / "runs"
