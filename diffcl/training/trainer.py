"""The shared trainer: BPR batches, Adam, validation every ``eval_every`` epochs, early stopping,
a checkpoint each epoch, resume after an interruption, and the run folder.

Run folder ``runs/<run-id>/``: ``config.yaml`` (resolved), ``run.json`` (the hash of the data it
was trained on), ``history.parquet`` (one row per epoch: loss parts, validation metrics, seconds),
``best.pt`` (weights of the best validation epoch), ``last.pt`` (tensors and counters to resume)
with ``history.json`` (the epochs so far), ``curves.png`` and ``metrics.json`` (``valid`` and
``test`` at the best epoch, ``best_epoch``, ``epoch_seconds``, ``eval_seconds``). Both checkpoints
hold only tensors and plain values and are read with ``torch.load(weights_only=True)``: a planted
checkpoint cannot run code. ``.lock`` is held while a process trains into the folder.
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import yaml

from diffcl.core.config import (
    RESULT_NEUTRAL_TRAIN_FIELDS,
    TRAINING_SECTIONS,
    PipelineConfig,
    dump_config,
)
from diffcl.core.device import keep_freed_memory, resolve_device
from diffcl.core.io import (
    atomic_path,
    sha256_file,
    write_json_atomic,
    write_parquet_atomic,
    write_text_atomic,
)
from diffcl.core.locks import LockBusy, exclusive_lock
from diffcl.core.prepared import PreparedDataError
from diffcl.core.workspace import DatasetDirs, RunIdError, check_run_id, new_run_id
from diffcl.data import InteractionData
from diffcl.models import Batch, ModelContext, Recommender, build_model
from diffcl.training.evaluator import Evaluator
from diffcl.training.sampler import BPRSampler

log = logging.getLogger(__name__)


class TrainError(RuntimeError):
    pass


class DivergedError(TrainError):
    """The loss became non-finite: these settings do not train (a search prunes such a trial)."""


class ResumeRefused(TrainError):
    """An existing run folder cannot be continued (other training config or data, broken history):
    the caller may start a fresh folder instead (the flow does)."""


def training_identity(config: PipelineConfig | dict[str, Any]) -> dict[str, Any]:
    """What defines a training run: the dataset's name and TRAINING_SECTIONS (model, train less
    where it runs, graphs, eval). Orchestration, fetch and publish settings are not part of it
    (data changes are checked by hash)."""
    data = config.model_dump(mode="json") if isinstance(config, PipelineConfig) else config
    sections = {section: data[section] for section in TRAINING_SECTIONS}
    sections["train"] = {k: v for k, v in sections["train"].items() if k not in RESULT_NEUTRAL_TRAIN_FIELDS}
    return {"dataset": data["dataset"]["name"], **sections}


def epoch_line(row: dict[str, Any], metric: str, best: bool) -> str:
    """One epoch as a log line: loss parts, the validation metric (on evaluation epochs), seconds."""
    parts = " ".join(f"{k} {row[k]:.4f}" for k in row
                     if k not in ("epoch", "train_seconds", "eval_seconds") and not k.startswith("valid_"))
    valid = f" | {metric} {row[f'valid_{metric}']:.4f}" if f"valid_{metric}" in row else ""
    return (f"epoch {row['epoch']:4d} | {parts}{valid}{' *' if best else ''} | "
            f"{row['train_seconds']:.2f}s + {row.get('eval_seconds', 0.0):.2f}s")


@dataclass
class TrainResult:
    run_dir: Path
    metrics: dict[str, Any]
    history: pl.DataFrame


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as err:
        raise TrainError(f"train.device: {err}") from None


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass: about 2.5x faster than foreach on CPU.
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)


def load_data(config: PipelineConfig) -> tuple[DatasetDirs, InteractionData]:
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    if not (dirs.prepared / "interactions.parquet").exists():
        raise TrainError(f"no prepared data in {dirs.prepared}; run `diffcl prepare` first")
    try:
        return dirs, InteractionData.load(dirs.prepared)
    except PreparedDataError as err:
        raise TrainError(str(err)) from None


def build_context(config: PipelineConfig, dirs: DatasetDirs, data: InteractionData, device: torch.device) -> ModelContext:
    """The data, the features of the modalities the model reads (and their frozen kNN graphs):
    a missing or unusable feature file is a TrainError naming it (see :func:`model_feature_files`)."""
    from diffcl.core.feature_files import FeatureFileError, model_feature_files, read_item_features
    from pipeline.graphs import modality_knn

    ctx = ModelContext(data=data, device=device, modality_weights=config.graphs.modality_weights)
    try:
        for modality, path in model_feature_files(config, dirs.features).items():  # none for ID-only models
            matrix, meta = read_item_features(path, data.n_items)
            if meta.get("untrained"):
                log.warning("%s features: %s", modality, meta.get("note", "untrained encoder"))
            ctx.features[modality] = matrix
            ctx.knn_graphs[modality], built = modality_knn(dirs, modality, matrix, path, config.graphs.knn_k,
                                                           config.graphs.chunk_items, config.graphs.ann_above)
            log.info("%s features %s; kNN graph %s", modality, matrix.shape, "built" if built else "loaded")
    except FeatureFileError as err:
        raise TrainError(str(err)) from None
    return ctx


def _checked_run_id(run_id: str) -> str:
    try:
        return check_run_id(run_id)
    except RunIdError as err:
        raise TrainError(str(err)) from None


def _load_checkpoint(path: Path, device: torch.device) -> Any:
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


class Trainer:
    """``on_epoch`` sees each epoch's history row (``valid_<metric>`` on evaluation epochs); an
    exception it raises stops training, resumable. ``evaluate_test=False`` never evaluates the
    test split (a hyper-parameter search must not see it): metrics.json then holds valid only."""

    def __init__(self, config: PipelineConfig, run_id: str | None = None,
                 on_epoch: Callable[[dict[str, Any]], None] | None = None, evaluate_test: bool = True):
        self.config = config
        self.evaluate_test = evaluate_test
        self.explicit_id = run_id is not None  # an existing folder of that name resumes
        self.run_id = _checked_run_id(run_id) if run_id is not None else new_run_id(config.model.name)
        tc = config.train
        if tc.threads:
            torch.set_num_threads(tc.threads)
        keep_freed_memory()  # a step frees and reallocates the same large tensors: reuse, don't remap
        self.device = pick_device(tc.device)
        self.dirs, self.data = load_data(config)
        seed_everything(tc.seed)
        self.ctx = build_context(config, self.dirs, self.data, self.device)
        try:
            self.model: Recommender = build_model(config.model.name, self.ctx, config.model)
        except KeyError as err:
            raise TrainError(str(err.args[0])) from None
        self.optimizer = make_optimizer(self.model, tc.lr)
        self.sampler = BPRSampler(self.data.train, tc.batch_size, tc.seed)
        self.evaluator = Evaluator(self.data, config.eval.topk, config.eval.batch_users, self.device)
        self.run_dir = self.dirs.runs / self.run_id
        self.on_epoch = on_epoch
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.best_value = -np.inf
        self.best_epoch = 0
        self.bad_evals = 0

    @property
    def final_splits(self) -> tuple[str, ...]:
        """The splits :meth:`finish` evaluates."""
        return ("valid", "test") if self.evaluate_test else ("valid",)

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        """Everything to resume that ``torch.load(weights_only=True)`` reads back: tensors, ints,
        floats and the sampler's bit-generator state (a dict of ints). Config and history live in
        text files beside it."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best_value": float(self.best_value),
            "best_epoch": self.best_epoch,
            "bad_evals": self.bad_evals,
            "sampler_rng": self.sampler.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }

    def _save(self, name: str, obj: Any) -> None:
        with atomic_path(self.run_dir / name) as tmp:
            torch.save(obj, tmp)

    def _save_progress(self) -> None:
        # History first: killed between the two writes, it is one epoch ahead of last.pt, and
        # _resume drops the epochs that last.pt does not hold.
        write_json_atomic(self.run_dir / "history.json", self.history)
        self._save("last.pt", self._state())

    def _resume(self) -> bool:
        path = self.run_dir / "last.pt"
        if not path.exists():
            return False
        self._check_same_config()
        self._check_same_data()
        state = _load_checkpoint(path, self.device)
        history_path = self.run_dir / "history.json"
        history = json.loads(history_path.read_text()) if history_path.exists() else state.get("history", [])
        self.history = [row for row in history if row["epoch"] <= state["epoch"]]
        if len(self.history) != state["epoch"]:
            raise ResumeRefused(f"{history_path} holds {len(self.history)} of the {state['epoch']} epochs in {path}; "
                                "the run cannot resume, use a new --run-id")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.best_value = state["epoch"], state["best_value"]
        self.best_epoch, self.bad_evals = state["best_epoch"], state["bad_evals"]
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        # The settings outside the training identity may differ (timeouts, overrides of other
        # stages): config.yaml shows those of the latest attempt.
        write_text_atomic(self.run_dir / "config.yaml", dump_config(self.config))
        log.info("resuming %s after epoch %d", self.run_id, self.epoch)
        return True

    def _check_same_config(self) -> None:
        config_path = self.run_dir / "config.yaml"
        try:
            started = training_identity(yaml.safe_load(config_path.read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
            raise ResumeRefused(f"{config_path}: missing or unreadable; the run cannot resume, use a new --run-id") from None
        current = training_identity(self.config)
        changed = [section for section in current if started.get(section) != current[section]]
        if changed:
            raise ResumeRefused(f"{self.run_dir} was started with another config (its {', '.join(changed)} "
                                "differ); use a new --run-id")

    def _check_same_data(self) -> None:
        recorded = recorded_data_hash(self.run_dir)
        if recorded and recorded != self.data.source_hash:
            raise ResumeRefused(data_changed_message(self.run_dir, recorded, self.data.source_hash))

    def _create_run_dir(self) -> None:
        """A new run gets a folder of its own; an explicit id of an existing folder resumes it."""
        self.dirs.runs.mkdir(parents=True, exist_ok=True)
        if self.explicit_id:
            self.run_dir.mkdir(exist_ok=True)
            return
        while True:
            try:
                self.run_dir.mkdir()
                return
            except FileExistsError:  # another run took this id in the same second
                self.run_id = new_run_id(self.config.model.name)
                self.run_dir = self.dirs.runs / self.run_id

    # ---------------------------------------------------------------- training
    def train_epoch(self) -> dict[str, float]:
        self.model.train()
        self.model.start_epoch(self.epoch)
        # Loss parts summed on the device (in float64, as Python floats would be): reading them
        # back every step would make a GPU wait for each step to finish.
        sums: dict[str, torch.Tensor] = {}
        steps = 0
        for users, pos, neg in self.sampler.epoch():
            batch = Batch(users.to(self.device), pos.to(self.device), neg.to(self.device))
            parts = self._loss(batch)
            self.optimizer.zero_grad(set_to_none=True)
            parts["loss"].backward()
            self.optimizer.step()
            for key, value in parts.items():
                sums[key] = sums[key] + value.detach().double() if key in sums else value.detach().double()
            steps += 1
        means = {key: float(value) / steps for key, value in sums.items()}
        if not np.isfinite(means["loss"]):  # read back once an epoch anyway: the check is free
            parts = ", ".join(f"{key} {value:.4g}" for key, value in means.items())
            raise DivergedError(f"non-finite loss at epoch {self.epoch} ({parts}); check the features / lower train.lr")
        return means

    def _loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)  # DistributedTrainer: through DDP, which averages the gradients

    @torch.no_grad()
    def evaluate(self, split: str) -> dict[str, float]:
        self.model.eval()
        users, items = self.model.embeddings()
        return self.evaluator.evaluate(users, items, split)

    def fit(self) -> TrainResult:
        self._create_run_dir()
        try:
            with exclusive_lock(self.run_dir / ".lock"):
                return self._fit_locked()
        except LockBusy as err:
            raise TrainError(f"run {self.run_id} is being trained by another process ({err.holder}); "
                             "wait for it, or start a new run without --run-id") from None

    def _fit_locked(self) -> TrainResult:
        tc = self.config.train
        resumed = self._resume()
        if not resumed:
            write_text_atomic(self.run_dir / "config.yaml", dump_config(self.config))
            write_json_atomic(self.run_dir / "run.json", {
                "run_id": self.run_id, "data_hash": self.data.source_hash,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
        log.info("training %s on %s: %d users, %d items, %d training pairs (%s)", self.model.describe(),
                 self.config.dataset.name, self.data.n_users, self.data.n_items, self.data.train.nnz, self.device)
        while self.epoch < tc.epochs and self.bad_evals < tc.patience:
            self.epoch += 1
            start = time.perf_counter()
            losses = self.train_epoch()
            train_s = time.perf_counter() - start
            row: dict[str, Any] = {"epoch": self.epoch, **losses, "train_seconds": train_s}
            if self.epoch % tc.eval_every == 0 or self.epoch == tc.epochs:
                start = time.perf_counter()
                valid = self.evaluate("valid")
                row["eval_seconds"] = time.perf_counter() - start
                row.update({f"valid_{k}": v for k, v in valid.items()})
                value = valid[tc.metric]
                if value > self.best_value:
                    self.best_value, self.best_epoch, self.bad_evals = value, self.epoch, 0
                    self._save("best.pt", self.model.state_dict())
                else:
                    self.bad_evals += 1
            self.history.append(row)
            self._save_progress()
            self._log_epoch(row)
            if self.on_epoch:
                self.on_epoch(row)
        return self.finish()

    def _log_epoch(self, row: dict[str, Any]) -> None:
        log.info("%s", epoch_line(row, self.config.train.metric, self.best_epoch == row["epoch"]))

    def finish(self) -> TrainResult:
        """Test at the best validation epoch (unless ``evaluate_test`` is off); write history,
        curves and metrics."""
        if not (self.run_dir / "best.pt").exists():
            raise TrainError(f"{self.run_dir}: no evaluated epoch, nothing to report")
        self.model.load_state_dict(torch.load(self.run_dir / "best.pt", weights_only=True, map_location=self.device))
        start = time.perf_counter()
        valid = self.evaluate("valid")
        eval_seconds = time.perf_counter() - start
        test = {"test": self.evaluate("test")} if self.evaluate_test else {}
        history = pl.DataFrame(self.history)
        metrics = {
            "model": self.config.model.name,
            "dataset": self.config.dataset.name,
            "run_id": self.run_id,
            "best_epoch": self.best_epoch,
            "epochs": self.epoch,
            "valid": valid,
            **test,
            "epoch_seconds": float(history.get_column("train_seconds").mean()),
            "eval_seconds": eval_seconds,
            "eval_users": {split: self.evaluator.n_users(split) for split in self.final_splits},
            "data_hash": self.data.source_hash,
            "device": str(self.device),
        }
        write_parquet_atomic(history, self.run_dir / "history.parquet")
        write_json_atomic(self.run_dir / "metrics.json", metrics)
        from diffcl.training.plots import plot_history

        plot_history(history, self.run_dir / "curves.png", self.config.train.metric, title=self.run_id)
        return TrainResult(self.run_dir, metrics, history)


def train(config: PipelineConfig, run_id: str | None = None) -> TrainResult:
    """One training run; data-parallel over the processes when launched by torchrun (WORLD_SIZE > 1)."""
    from diffcl.training.distributed import DistributedTrainer, world_size

    return (DistributedTrainer if world_size() > 1 else Trainer)(config, run_id).fit()


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


def load_run(run_dir: Path, same_data: bool = True) -> tuple[PipelineConfig, Trainer]:
    """A trainer for a finished (or interrupted) run, with its best weights loaded. Refused with a
    clear error when the prepared data has changed since the run was trained, unless ``same_data``
    is off (a champion rescored on new data with the same users and items)."""
    from diffcl.core.config import ConfigError, load_config

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise TrainError(f"{run_dir} is not a run folder (no config.yaml)")
    best = run_dir / "best.pt"
    if not best.exists():
        raise TrainError(f"{run_dir}: no best.pt checkpoint yet")
    try:
        config = load_config(yaml.safe_load(config_path.read_text()))
    except ConfigError as err:
        raise TrainError(f"{config_path}: {err}") from None
    interactions = DatasetDirs.of(config.workspace, config.dataset.name).prepared / "interactions.parquet"
    recorded = recorded_data_hash(run_dir)
    if same_data and recorded and interactions.exists() and (current := sha256_file(interactions)) != recorded:
        raise TrainError(data_changed_message(run_dir, recorded, current))
    trainer = Trainer(config)  # a generated id creates nothing; the run is the folder given
    trainer.run_id, trainer.run_dir = run_dir.name, run_dir
    weights = _load_checkpoint(best, trainer.device)
    try:
        trainer.model.load_state_dict(weights)
    except RuntimeError as err:  # a run without a recorded data hash, trained on other data
        raise TrainError(f"{best} does not fit the current data or model ({str(err).splitlines()[0][:160]}); "
                         "train a new run: `diffcl train CONFIG`") from None
    return config, trainer
