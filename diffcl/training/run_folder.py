"""A training run's folder, ``runs/<run-id>/``: ``config.yaml`` (resolved), ``run.json`` (the hash of
the data it was trained on), ``history.parquet`` (one row per epoch: loss parts, validation
metrics, seconds), ``best.pt`` (weights of the best validation epoch), ``last.pt`` (tensors and
counters to resume) with ``history.json`` (the epochs so far), ``curves.png`` and ``metrics.json``
(``valid`` and ``test`` at the best epoch, ``best_epoch``, ``epoch_seconds``, ``eval_seconds``).
Both checkpoints hold only tensors and plain values and are read with
``torch.load(weights_only=True)``: a planted checkpoint cannot run code. ``.lock`` is held while a
process trains into the folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import ValidationError

from diffcl.core.config import (
    RESULT_NEUTRAL_TRAIN_FIELDS,
    TRAINING_SECTIONS,
    PipelineConfig,
    dump_config,
)
from diffcl.core.io import write_json_atomic, write_text_atomic
from diffcl.core.workspace import new_run_id
from diffcl.training.errors import ResumeRefused, TrainError


def training_identity(config: PipelineConfig | dict[str, Any]) -> dict[str, Any]:
    """What defines a training run: the dataset's name and TRAINING_SECTIONS (model, train less
    where it runs, graphs, eval). Orchestration, fetch and publish settings are not part of it
    (data changes are checked by hash)."""
    data = config.model_dump(mode="json") if isinstance(config, PipelineConfig) else config
    sections = {section: data[section] for section in TRAINING_SECTIONS}
    sections["train"] = {k: v for k, v in sections["train"].items() if k not in RESULT_NEUTRAL_TRAIN_FIELDS}
    return {"dataset": data["dataset"]["name"], **sections}


def load_checkpoint(path: Path, device: torch.device | str = "cpu") -> Any:
    """Tensors and plain values only: a pickled object that would run code is refused, not run."""
    try:
        return torch.load(path, weights_only=True, map_location=device)
    except Exception as err:  # UnpicklingError for a foreign object; anything else for a broken file
        raise TrainError(f"{path}: not a diffcl checkpoint of tensors and plain values, refused ({_load_failure(err)})") from None


def _load_failure(err: Exception) -> str:
    """The line of torch's long message that says what was refused (it also suggests loading with
    the unsafe loader, which is exactly what must not be done here)."""
    text = str(err)
    found = re.search(r"Unsupported (?:global: GLOBAL [\w.]+|operand \d+)", text)
    if found:
        return found.group(0)
    lines = text.strip().splitlines()
    return lines[0][:160] if lines else type(err).__name__


def recorded_data_hash(run_dir: Path) -> str | None:
    """The sha256 of the interactions a run was trained on: ``run.json``, or ``metrics.json`` for
    runs from before it existed."""
    for name in ("run.json", "metrics.json"):
        path = Path(run_dir) / name
        if path.exists():
            value = json.loads(path.read_text()).get("data_hash")
            if value:
                return value
    return None


def data_changed_message(run_dir: Path, recorded: str, current: str) -> str:
    return (f"{run_dir}: the prepared data changed since this run was trained (interactions sha256 "
            f"{recorded[:12]} then, {current[:12]} now); its weights do not fit it. "
            "Train a new run on the current data: `diffcl train CONFIG`")


@dataclass
class RunFolder:
    """Where a run writes and what identifies it: the resolved config and the data's hash. A new
    run gets a folder of its own (a generated id); an explicit id of an existing folder resumes."""

    runs: Path
    run_id: str
    config: PipelineConfig
    data_hash: str
    explicit: bool = False

    @property
    def path(self) -> Path:
        return self.runs / self.run_id

    def create(self) -> None:
        self.runs.mkdir(parents=True, exist_ok=True)
        if self.explicit:
            self.path.mkdir(exist_ok=True)
            return
        while True:
            try:
                self.path.mkdir()
                return
            except FileExistsError:  # another run took this id in the same second
                self.run_id = new_run_id(self.config.model.name)

    def record_config(self) -> None:
        """config.yaml: the resolved config of the latest attempt (a resumed run may differ outside
        the training identity: timeouts, other stages' overrides)."""
        write_text_atomic(self.path / "config.yaml", dump_config(self.config))

    def start(self) -> None:
        self.record_config()
        write_json_atomic(self.path / "run.json", {
            "run_id": self.run_id, "data_hash": self.data_hash,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        })

    def describe(self) -> dict[str, Any]:
        """The run's fields of metrics.json."""
        return {"model": self.config.model.name, "dataset": self.config.dataset.name, "run_id": self.run_id,
                "data_hash": self.data_hash}

    def resumable_state(self, device: torch.device) -> dict[str, Any] | None:
        """``last.pt`` with ``history`` (the epochs it holds), after checking that the folder was
        started with this config and data; None when there is nothing to resume."""
        path = self.path / "last.pt"
        if not path.exists():
            return None
        self._check_same_config()
        self._check_same_data()
        state = load_checkpoint(path, device)
        history_path = self.path / "history.json"
        history = json.loads(history_path.read_text()) if history_path.exists() else state.get("history", [])
        state["history"] = [row for row in history if row["epoch"] <= state["epoch"]]
        if len(state["history"]) != state["epoch"]:
            raise ResumeRefused(f"{history_path} holds {len(state['history'])} of the {state['epoch']} epochs in "
                                f"{path}; the run cannot resume, use a new --run-id")
        return state

    def _check_same_config(self) -> None:
        config_path = self.path / "config.yaml"
        try:
            recorded = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            raise ResumeRefused(f"{config_path}: missing or unreadable; the run cannot resume, use a new --run-id") from None
        try:
            # Validated, so that a field added since the run started compares at its default.
            started = training_identity(PipelineConfig.model_validate(recorded))
        except (ValidationError, TypeError) as err:
            raise ResumeRefused(f"{config_path}: not a config this version reads ({str(err).splitlines()[0]}); "
                                "the run cannot resume, use a new --run-id") from None
        current = training_identity(self.config)
        changed = [section for section in current if started.get(section) != current[section]]
        if changed:
            raise ResumeRefused(f"{self.path} was started with another config (its {', '.join(changed)} "
                                "differ); use a new --run-id")

    def _check_same_data(self) -> None:
        recorded = recorded_data_hash(self.path)
        if recorded and recorded != self.data_hash:
            raise ResumeRefused(data_changed_message(self.path, recorded, self.data_hash))
