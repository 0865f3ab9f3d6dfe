"""The on-disk layout every stage agrees on: ``<workspace>/<dataset>/{raw,prepared,...}``."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

# A run id names one folder under runs/: no separators, no leading dot (so never "." or "..").
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class RunIdError(ValueError):
    pass


def check_run_id(run_id: str, what: str = "run id") -> str:
    """``run_id`` itself, or RunIdError: ids are folder names, never paths out of ``runs/``.
    ``what`` names the value in the message (a study name follows the same rule)."""
    if not RUN_ID_PATTERN.fullmatch(run_id):
        raise RunIdError(f"invalid {what} {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return run_id


def new_run_id(prefix: str) -> str:
    """``<prefix>-YYYYmmdd-HHMMSS-<4 hex>``: sortable by time, and two runs started in the same
    second still get different ids (the folder is then created exclusively as well)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return check_run_id(f"{prefix}-{stamp}-{secrets.token_hex(2)}")


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
