"""The model registry of a dataset: every trained model with its metrics, config and data hashes,
and which one is in production (champion / challenger on a validation metric)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diffcl.io import write_json_atomic
from diffcl.locks import LockBusy, exclusive_lock

LOCK_TIMEOUT_S = 60.0  # a registration takes milliseconds: waiting longer means a stuck process


class RegistryBusy(RuntimeError):
    pass


@dataclass
class Decision:
    version: int
    promoted: bool
    champion: dict[str, Any] | None  # the production entry before this decision
    reason: str


class Registry:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict[str, Any] = self._read()

    def _read(self) -> dict[str, Any]:
        return json.loads(self.path.read_text()) if self.path.exists() else {"production": None, "versions": []}

    @property
    def versions(self) -> list[dict[str, Any]]:
        return self.data["versions"]

    def production(self) -> dict[str, Any] | None:
        version = self.data["production"]
        return next((v for v in self.versions if v["version"] == version), None)

    def register(self, entry: dict[str, Any], metric: str, promote_if: str = "at_least") -> Decision:
        """Add a version; promote it when its validation ``metric`` is at least (or strictly above,
        with ``promote_if='better'``) the production model's. The file is locked from reading to
        writing, so two pipelines publishing at once get distinct versions and both are kept."""
        lock = self.path.with_name(f"{self.path.name}.lock")
        try:
            with exclusive_lock(lock, timeout_s=LOCK_TIMEOUT_S):
                self.data = self._read()  # what other processes registered since this one read it
                return self._register(entry, metric, promote_if)
        except LockBusy as err:
            raise RegistryBusy(f"{self.path} is being updated by another process (pid {err.pid}) "
                               f"for more than {LOCK_TIMEOUT_S:.0f} s; try again") from None

    def _register(self, entry: dict[str, Any], metric: str, promote_if: str) -> Decision:
        champion = self.production()
        version = max((v["version"] for v in self.versions), default=0) + 1
        value = entry["valid"][metric]
        if champion is None:
            promoted, reason = True, "first model"
        else:
            best = champion["valid"][metric]
            promoted = value >= best if promote_if == "at_least" else value > best
            reason = f"valid {metric} {value:.4f} {'>=' if promoted else '<'} champion v{champion['version']} {best:.4f}"
        self.versions.append({**entry, "version": version, "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "promoted": promoted})
        if promoted:
            self.data["production"] = version
        write_json_atomic(self.path, self.data)
        return Decision(version, promoted, champion, reason)
