"""The model registry of a dataset: every trained model with its metrics, config and data hashes,
and which one is in production (champion / challenger on a validation metric).

Champion and challenger are compared on the same data: when the data changed since the champion
was registered, the champion is first evaluated on the challenger's data (``rescore``). When it
cannot be (other users or items, other features), the rule is: the challenger, the only model
trained on the current data, is promoted, and the decision says the data changed. A champion on the
same data whose evaluation lacks ``publish.metric`` (registered before the metric existed) is
rescored too; when that fails, the challenger is promoted and the decision says why."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from diffcl.core.config import PipelineConfig
from diffcl.core.io import write_json_atomic
from diffcl.core.locks import LockBusy, exclusive_lock

LOCK_TIMEOUT_S = 60.0  # a registration takes milliseconds: waiting longer means a stuck process


class RegistryBusy(RuntimeError):
    pass


class PublishError(ValueError):
    """A run that cannot be registered as configured (e.g. it lacks the ``publish.metric``)."""


def check_publish_metric(metric: str, reported: set[str]) -> None:
    """publish.metric must be among a run's validation metrics (cold_recall@20 needs new items); the
    flow checks it before training too, against what the evaluator will report."""
    if metric not in reported:
        raise PublishError(f"publish.metric {metric!r} is not among the run's validation metrics "
                           f"({', '.join(sorted(reported)) or 'none'}); choose one of them")


@dataclass
class Decision:
    version: int
    promoted: bool
    champion: dict[str, Any] | None  # the production entry before this decision
    reason: str
    champion_on_this_data: dict[str, float] | None = None  # its validation metrics on the challenger's data
    data_changed: bool = False  # the champion was registered on other data


# The champion's validation metrics on the current data, or None with the reason it cannot be measured.
Rescore = Callable[[dict[str, Any]], "tuple[dict[str, float] | None, str]"]


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

    def register(self, entry: dict[str, Any], metric: str, promote_if: str = "at_least",
                 rescore: Rescore | None = None) -> Decision:
        """Add a version; promote it when its validation ``metric`` is at least (or strictly above,
        with ``promote_if='better'``) the production model's on the same data (see the module
        docstring). The file is locked from reading to writing, so two pipelines publishing at once
        get distinct versions and both are kept; the champion is rescored before, outside the lock."""
        champion = self.production()
        rescored = None
        check_publish_metric(metric, set(entry["valid"]))
        if champion is not None and rescore is not None and not _comparable(champion, entry, metric):
            rescored = (champion["version"], *rescore(champion))
        lock = self.path.with_name(f"{self.path.name}.lock")
        try:
            with exclusive_lock(lock, timeout_s=LOCK_TIMEOUT_S):
                self.data = self._read()  # what other processes registered since this one read it
                return self._register(entry, metric, promote_if, rescored)
        except LockBusy as err:
            raise RegistryBusy(f"{self.path} is being updated by another process ({err.holder}) "
                               f"for more than {LOCK_TIMEOUT_S:.0f} s; try again") from None

    def _register(self, entry: dict[str, Any], metric: str, promote_if: str,
                  rescored: tuple[int, dict[str, float] | None, str] | None) -> Decision:
        champion = self.production()
        if rescored is not None and (champion is None or rescored[0] != champion["version"]):
            rescored = None  # another process promoted a new champion meanwhile
        version = max((v["version"] for v in self.versions), default=0) + 1
        value = entry["valid"][metric]
        on_this_data, data_changed = None, False
        if champion is None:
            promoted, reason = True, "first model"
        elif _comparable(champion, entry, metric):
            promoted, reason = _compare(value, champion["valid"][metric], promote_if, metric, champion, "")
        elif rescored is not None and rescored[1] is not None and metric in rescored[1]:
            on_this_data = rescored[1]
            own = champion["valid"].get(metric)
            promoted, reason = _compare(value, on_this_data[metric], promote_if, metric, champion,
                                        f" on this data ({own:.4f} on its own)" if own is not None
                                        else " (rescored: its own evaluation lacks the metric)")
        elif not _other_data(champion, entry):
            promoted = True
            reason = (f"champion v{champion['version']} has no valid {metric} and could not be rescored "
                      f"({_why_not_rescored(rescored)}): the challenger is promoted")
        else:
            why = _why_not_rescored(rescored)
            promoted, data_changed = True, True
            reason = (f"the data changed since champion v{champion['version']}, which cannot be evaluated on it "
                      f"({why}): the model of the current data is promoted")
        self.versions.append({**entry, "version": version, "registered_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              "promoted": promoted,
                              **({"champion_on_this_data": {"version": champion["version"], "valid": on_this_data}}
                                 if on_this_data else {})})
        if promoted:
            self.data["production"] = version
        write_json_atomic(self.path, self.data)
        return Decision(version, promoted, champion, reason, on_this_data, data_changed)


def _other_data(champion: dict[str, Any], entry: dict[str, Any]) -> bool:
    return champion.get("data_sha256") != entry.get("data_sha256")


def _why_not_rescored(rescored: tuple[int, dict[str, float] | None, str] | None) -> str:
    if rescored is None:
        return "not evaluated"
    return rescored[2] or "its evaluation lacks the metric"


def _comparable(champion: dict[str, Any], entry: dict[str, Any], metric: str) -> bool:
    """Whether the champion's own validation ``metric`` compares with the challenger's as it stands:
    same data, and measured (a champion registered before the metric existed lacks it)."""
    return not _other_data(champion, entry) and metric in champion["valid"]


def _compare(value: float, best: float, promote_if: str, metric: str, champion: dict[str, Any],
             where: str) -> tuple[bool, str]:
    promoted = value >= best if promote_if == "at_least" else value > best
    return promoted, (f"valid {metric} {value:.4f} {'>=' if promoted else '<'} champion v{champion['version']} "
                      f"{best:.4f}{where}")


def champion_rescorer(id_tables: dict[str, str]) -> Rescore:
    """The registry's ``rescore``: a champion's validation metrics on the current data, measured
    only when its users and items are this data's (same id tables), with its own config and weights."""
    from pipeline.evaluate import evaluate_run

    def rescore(champion: dict[str, Any]) -> tuple[dict[str, float] | None, str]:
        if "id_tables" not in champion:
            return None, "it was registered without its id tables"
        if champion["id_tables"] != id_tables:
            return None, "its users or items differ from this data's"
        try:
            return evaluate_run(Path(champion["run_dir"]), ("valid",), same_data=False)["valid"], ""
        except Exception as err:  # any failure to rebuild it means: not comparable, by the documented rule
            return None, f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"

    return rescore


def publish_run(config: PipelineConfig, run_dir: Path, evaluation: dict[str, Any], data_hash: str,
                id_tables: dict[str, str]) -> Decision:
    """The publish stage: register the evaluated run; it becomes the production model by the rule
    of :meth:`Registry.register`, the champion rescored on this data first where it can be."""
    from diffcl.core.workspace import DatasetDirs
    from diffcl.training.run_folder import training_identity

    registry = Registry(DatasetDirs.of(config.workspace, config.dataset.name).root / "registry.json")
    identity = json.dumps(training_identity(config), sort_keys=True, default=str)
    entry = {
        "model": config.model.name, "run_dir": str(run_dir), "valid": evaluation["valid"], "test": evaluation["test"],
        "config_sha256": hashlib.sha256(identity.encode()).hexdigest(), "data_sha256": data_hash, "id_tables": id_tables,
    }
    return registry.register(entry, config.publish.metric, config.publish.promote_if, champion_rescorer(id_tables))
