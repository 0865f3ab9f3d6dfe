"""The shared training loop: BPR batches, Adam, validation every ``eval_every`` epochs, early
stopping, and, given a run folder, a checkpoint each epoch and resume after an interruption.

The trainer takes its parts ready-made (model, sampler, evaluator, train settings), so tests and
probes train on in-memory data; :func:`diffcl.training.run.build_run` makes them from a config and
the workspace. Without a run folder the best weights are kept in memory and nothing is written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from diffcl.core.config import TrainConfig
from diffcl.core.io import atomic_path, write_json_atomic, write_parquet_atomic
from diffcl.core.locks import LockBusy, exclusive_lock
from diffcl.models import Batch, Recommender
from diffcl.training.averaging import WeightAverage
from diffcl.training.errors import DivergedError, TrainError
from diffcl.training.evaluator import Evaluator, evaluate_model
from diffcl.training.run_folder import RunFolder, load_checkpoint
from diffcl.training.sampler import BPRSampler

log = logging.getLogger(__name__)


def epoch_line(row: dict[str, Any], metric: str, best: bool) -> str:
    """One epoch as a log line: loss parts, the validation metric (on evaluation epochs), seconds."""
    parts = " ".join(f"{k} {row[k]:.4f}" for k in row
                     if k not in ("epoch", "train_seconds", "eval_seconds") and not k.startswith("valid_"))
    valid = f" | {metric} {row[f'valid_{metric}']:.4f}" if f"valid_{metric}" in row else ""
    return (f"epoch {row['epoch']:4d} | {parts}{valid}{' *' if best else ''} | "
            f"{row['train_seconds']:.2f}s + {row.get('eval_seconds', 0.0):.2f}s")


@dataclass
class TrainResult:
    run_dir: Path | None  # None: trained in memory
    metrics: dict[str, Any]
    history: pl.DataFrame


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass: about 2.5x faster than foreach on CPU.
    try:
        return torch.optim.Adam(model.parameters(), lr=lr, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.Adam(model.parameters(), lr=lr)


class Trainer:
    """``on_epoch`` sees each epoch's history row (``valid_<metric>`` on evaluation epochs); an
    exception it raises stops training, resumable. ``evaluate_test=False`` never evaluates the
    test split (a hyper-parameter search must not see it): the metrics then hold valid only."""

    def __init__(self, model: Recommender, sampler: BPRSampler, evaluator: Evaluator, settings: TrainConfig,
                 run: RunFolder | None = None, on_epoch: Callable[[dict[str, Any]], None] | None = None,
                 evaluate_test: bool = True):
        self.model, self.sampler, self.evaluator, self.settings = model, sampler, evaluator, settings
        self.device = evaluator.device
        self.optimizer = make_optimizer(model, settings.lr)
        self.average = WeightAverage(model, settings.ema_decay) if settings.ema_decay > 0 else None
        self.run = run
        self.on_epoch = on_epoch
        self.evaluate_test = evaluate_test
        self.history: list[dict[str, Any]] = []
        self.epoch = 0
        self.best_value = -np.inf
        self.best_epoch = 0
        self.bad_evals = 0
        self._best_weights: dict[str, torch.Tensor] | None = None  # without a run folder

    @property
    def run_dir(self) -> Path | None:
        return self.run.path if self.run else None

    @property
    def run_id(self) -> str:
        return self.run.run_id if self.run else "in-memory"

    @property
    def final_splits(self) -> tuple[str, ...]:
        """The splits :meth:`finish` evaluates."""
        return ("valid", "test") if self.evaluate_test else ("valid",)

    # ---------------------------------------------------------------- checkpoints
    def _state(self) -> dict[str, Any]:
        """Everything to resume that ``torch.load(weights_only=True)`` reads back: tensors, ints,
        floats and the sampler's bit-generator state (a dict of ints). History lives beside it."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "best_value": float(self.best_value),
            "best_epoch": self.best_epoch,
            "bad_evals": self.bad_evals,
            "sampler_rng": self.sampler.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            **({"weight_average": self.average.state_dict()} if self.average else {}),
        }

    def _save(self, name: str, obj: Any) -> None:
        with atomic_path(self.run.path / name) as tmp:
            torch.save(obj, tmp)

    def _save_best(self) -> None:
        if self.run:
            self._save("best.pt", self.model.state_dict())
        else:
            self._best_weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _save_progress(self) -> None:
        if self.run:
            # History first: killed between the two writes, it is one epoch ahead of last.pt, and
            # the resume drops the epochs that last.pt does not hold.
            write_json_atomic(self.run.path / "history.json", self.history)
            self._save("last.pt", self._state())

    def _resume(self) -> bool:
        state = self.run.resumable_state(self.device)
        if state is None:
            return False
        self.history = state["history"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.best_value = state["epoch"], state["best_value"]
        self.best_epoch, self.bad_evals = state["best_epoch"], state["bad_evals"]
        self.sampler.rng.bit_generator.state = state["sampler_rng"]
        torch.set_rng_state(state["torch_rng"])
        if self.average:  # the run's config, checked by resumable_state, says the checkpoint holds one
            self.average.load_state_dict(state["weight_average"])
        self.run.record_config()
        log.info("resuming %s after epoch %d", self.run_id, self.epoch)
        return True

    def _create_run_dir(self) -> None:
        self.run.create()

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
            if self.average:
                self.average.update()
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

    def evaluate(self, split: str) -> dict[str, float]:
        return evaluate_model(self.model, self.evaluator, split)

    def _evaluated_weights(self) -> AbstractContextManager[None]:
        """The weights that validation scores and best.pt keeps: the average, where there is one."""
        return self.average.applied() if self.average else nullcontext()

    def check_metric(self) -> None:
        """train.metric must be one the validation split reports (cold_recall@20 needs new items):
        said before a run folder or an epoch, not after the first evaluation."""
        metric = self.settings.metric
        if metric not in (reported := self.evaluator.reported_metrics("valid")):
            raise TrainError(f"train.metric {metric!r} is not among the validation metrics of this data: "
                             f"{', '.join(sorted(reported)) or 'none (the validation split is empty)'}")

    def fit(self) -> TrainResult:
        self.check_metric()
        if self.run is None:
            return self._fit_locked()
        self._create_run_dir()
        try:
            with exclusive_lock(self.run.path / ".lock"):
                return self._fit_locked()
        except LockBusy as err:
            raise TrainError(f"run {self.run_id} is being trained by another process ({err.holder}); "
                             "wait for it, or start a new run without --run-id") from None

    def _fit_locked(self) -> TrainResult:
        tc = self.settings
        if self.run and not self._resume():
            self.run.start()
        data = self.evaluator.data
        log.info("training %s: %d users, %d items, %d training pairs (%s)", self.model.describe(),
                 data.n_users, data.n_items, data.train.nnz, self.device)
        while self.epoch < tc.epochs and self.bad_evals < tc.patience:
            self.epoch += 1
            start = time.perf_counter()
            losses = self.train_epoch()
            train_s = time.perf_counter() - start
            row: dict[str, Any] = {"epoch": self.epoch, **losses, "train_seconds": train_s}
            if self.epoch % tc.eval_every == 0 or self.epoch == tc.epochs:
                with self._evaluated_weights():
                    start = time.perf_counter()
                    valid = self.evaluate("valid")
                    row["eval_seconds"] = time.perf_counter() - start
                    row.update({f"valid_{k}": v for k, v in valid.items()})
                    value = valid[tc.metric]
                    if value > self.best_value:
                        self.best_value, self.best_epoch, self.bad_evals = value, self.epoch, 0
                        self._save_best()
                    else:
                        self.bad_evals += 1
            self.history.append(row)
            self._save_progress()
            self._log_epoch(row)
            if self.on_epoch:
                self.on_epoch(row)
        return self.finish()

    def _log_epoch(self, row: dict[str, Any]) -> None:
        log.info("%s", epoch_line(row, self.settings.metric, self.best_epoch == row["epoch"]))

    def _restore_best(self) -> None:
        if self.run is None:
            if self._best_weights is None:
                raise TrainError("no evaluated epoch, nothing to report")
            self.model.load_state_dict(self._best_weights)
            return
        best = self.run.path / "best.pt"
        if not best.exists():
            raise TrainError(f"{self.run.path}: no evaluated epoch, nothing to report")
        self.model.load_state_dict(load_checkpoint(best, self.device))

    def finish(self) -> TrainResult:
        """Test at the best validation epoch (unless ``evaluate_test`` is off); with a run folder,
        write history, curves and metrics there."""
        self._restore_best()
        start = time.perf_counter()
        valid = self.evaluate("valid")
        eval_seconds = time.perf_counter() - start
        test = {"test": self.evaluate("test")} if self.evaluate_test else {}
        history = pl.DataFrame(self.history)
        metrics = {
            **(self.run.describe() if self.run else {}),
            "best_epoch": self.best_epoch,
            "epochs": self.epoch,
            "valid": valid,
            **test,
            "epoch_seconds": float(history.get_column("train_seconds").mean()),
            "eval_seconds": eval_seconds,
            "eval_users": {split: self.evaluator.n_users(split) for split in self.final_splits},
            "device": str(self.device),
        }
        if self.run:
            write_parquet_atomic(history, self.run.path / "history.parquet")
            write_json_atomic(self.run.path / "metrics.json", metrics)
            from diffcl.training.plots import plot_history

            plot_history(history, self.run.path / "curves.png", self.settings.metric, title=self.run_id)
        return TrainResult(self.run_dir, metrics, history)
