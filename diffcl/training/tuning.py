"""Hyper-parameter search on the validation metric: Optuna's TPE sampler over the model's declared
search space (:func:`diffcl.core.config.search_space`), median pruning of trials whose per-epoch
validation curve trails the others', every trial trained by the same trainer (:func:`diffcl.training.run.build_run`).

The study lives in ``<workspace>/<dataset>/tuning/<study>.db`` (Optuna's SQLite storage), so a
search that was stopped resumes: ``trials`` counts finished (complete or pruned) trials of the
whole study, and a trial that a killed process left running is marked failed and its parameters
queued again. Trial ``n`` trains into ``runs/tune-<study>-<n>`` and never evaluates the test split:
a search that saw test metrics would select on them. A new study's first trial is the config's own
setting, so the search starts from it. The best trial is written as a config overlay
(``tuning/<study>-best.yaml``, only the searched keys) for ``--overlay``.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from diffcl.core.config import (
    Choice,
    IntRange,
    LogUniform,
    PipelineConfig,
    SearchSpace,
    load_config,
    overlay_overrides,
    search_space,
)
from diffcl.core.io import write_text_atomic
from diffcl.core.locks import LockBusy, exclusive_lock
from diffcl.core.workspace import DatasetDirs, RunIdError, check_run_id
from diffcl.training.errors import DivergedError
from diffcl.training.run import build_run

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class TuneError(RuntimeError):
    pass


@dataclass(frozen=True)
class SearchBudget:
    """How much a search may spend: ``trials`` finished trials in the study, each trained for at
    most ``max_epochs`` (null: the config's train.epochs); ``timeout_s`` bounds this invocation."""

    trials: int
    max_epochs: int | None = None
    timeout_s: float | None = None
    prune_startup_trials: int = 3  # trials finished before any is pruned
    prune_warmup_epochs: int = 5  # no trial is pruned before this epoch
    # A trial's value: the best mean validation over this many consecutive evaluations (1: its best
    # evaluation). Wider windows stop a noisy curve's one lucky epoch from winning the search.
    select_window: int = 1


@dataclass
class TrialSummary:
    number: int
    state: str
    value: float | None
    params: dict[str, Any]
    epochs: int | None
    best_epoch: int | None
    seconds: float | None
    note: str = ""


@dataclass
class TuneResult:
    study: str
    storage: Path
    metric: str
    space: SearchSpace
    trials: list[TrialSummary]
    best: TrialSummary | None
    overlay_path: Path | None
    overlay: dict[str, Any] = field(default_factory=dict)
    epoch_caps: list[int] = field(default_factory=list)
    prune_warmups: list[int] = field(default_factory=list)
    select_window: int = 1  # the study's SearchBudget.select_window

    def count(self, *states: str) -> int:
        return sum(t.state in states for t in self.trials)


# ------------------------------------------------------------------------------------ paths
def tuning_dir(config: PipelineConfig) -> Path:
    return DatasetDirs.of(config.workspace, config.dataset.name).root / "tuning"


def study_paths(config: PipelineConfig, study: str) -> tuple[Path, Path]:
    """The study's SQLite database and its best-trial overlay."""
    folder = tuning_dir(config)
    return folder / f"{study}.db", folder / f"{study}-best.yaml"


def trial_run_id(study: str, number: int | str) -> str:
    """The run folder of trial ``number`` (``"*"``: the pattern of all of the study's)."""
    return f"tune-{study}-{number}"


# ------------------------------------------------------------------------------------ trials
def suggest(trial: optuna.Trial, space: SearchSpace) -> dict[str, Any]:
    """One value per dotted key, drawn by the trial's sampler from its declared range."""
    params = {}
    for key, spec in space.items():
        if isinstance(spec, LogUniform):
            params[key] = trial.suggest_float(key, spec.low, spec.high, log=True)
        elif isinstance(spec, IntRange):
            params[key] = trial.suggest_int(key, spec.low, spec.high)
        elif isinstance(spec, Choice):
            params[key] = trial.suggest_categorical(key, list(spec.options))
        else:
            raise TypeError(f"{key}: unknown search range {spec!r}")
    return params


def nest(params: dict[str, Any]) -> dict[str, Any]:
    """Dotted keys -> the nested mapping of a config overlay."""
    tree: dict[str, Any] = {}
    for key, value in params.items():
        *sections, leaf = key.split(".")
        node = tree
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return tree


def trial_config(base: PipelineConfig, params: dict[str, Any], max_epochs: int | None) -> PipelineConfig:
    """The base config with a trial's values, validated like any ``--set``."""
    overrides = overlay_overrides(nest(params))
    if max_epochs is not None:
        overrides.append(f"train.epochs={min(max_epochs, base.train.epochs)}")
    return load_config(base.model_dump(mode="json"), overrides)


def starting_point(config: PipelineConfig, space: SearchSpace) -> dict[str, Any]:
    """The config's own values of the searched keys that lie in their ranges: a new study's first
    trial, so that a search's best is never a setting worse on validation than the one it started
    from (out-of-range keys are left to the sampler)."""
    params = {}
    for key, spec in space.items():
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        if isinstance(spec, Choice):
            inside = value in spec.options
        else:
            inside = spec.low <= value <= spec.high
        if inside:
            params[key] = value
    return params


def report_epoch(trial: optuna.Trial, row: dict[str, Any], metric: str, curve: list[float] | None = None) -> None:
    """Report an evaluation epoch's validation value to the trial (and append it to ``curve``);
    :class:`optuna.TrialPruned` when the pruner finds the curve trailing the other trials' at this epoch."""
    value = row.get(f"valid_{metric}")
    if value is None:  # not an evaluation epoch
        return
    if curve is not None:
        curve.append(value)
    trial.report(value, step=row["epoch"])
    if trial.should_prune():
        raise optuna.TrialPruned(f"pruned at epoch {row['epoch']} ({metric} {value:.4f})")


def windowed_best(curve: list[float], window: int) -> float:
    """The best mean over ``window`` consecutive values of ``curve`` (the mean of all of them where
    the curve is shorter)."""
    if not curve:
        raise ValueError("no validation value was reported")
    width = min(window, len(curve))
    return max(sum(curve[i : i + width]) / width for i in range(len(curve) - width + 1))


def _objective(base: PipelineConfig, space: SearchSpace, study: str, budget: SearchBudget) -> Callable[[optuna.Trial], float]:
    metric = base.train.metric

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, space)
        config = trial_config(base, params, budget.max_epochs)
        run_id = trial_run_id(study, trial.number)
        trial.set_user_attr("run_id", run_id)
        trial.set_user_attr("max_epochs", config.train.epochs)
        trial.set_user_attr("prune_warmup", budget.prune_warmup_epochs)
        curve: list[float] = []
        trainer = build_run(config, run_id, on_epoch=lambda row: report_epoch(trial, row, metric, curve),
                            evaluate_test=False)
        if trainer.run_dir.exists():  # trial numbers only grow: this folder is from a study since removed
            raise TuneError(f"{trainer.run_dir} already exists (from an earlier study {study!r} whose database "
                            f"was removed?); remove the {trial_run_id(study, '*')} run folders or use another --study")
        start = time.perf_counter()
        try:
            metrics = trainer.fit().metrics
            trial.set_user_attr("best_epoch", metrics["best_epoch"])
            if budget.select_window > 1:
                return windowed_best(curve, budget.select_window)
            return metrics["valid"][metric]
        except DivergedError as err:
            trial.set_user_attr("note", "diverged")
            raise optuna.TrialPruned(str(err)) from None
        except KeyboardInterrupt:
            trial.study.enqueue_trial(params, user_attrs={"retry_of": trial.number})  # resumes with these
            raise
        finally:
            trial.set_user_attr("epochs", trainer.epoch)
            trial.set_user_attr("seconds", time.perf_counter() - start)

    return objective


# ------------------------------------------------------------------------------------ the study
def make_sampler(seed: int, trials_so_far: int, budget: SearchBudget) -> optuna.samplers.TPESampler:
    """TPE seeded from train.seed and the trials already in the study: a resumed search draws
    new random start-up points instead of repeating the first invocation's."""
    with warnings.catch_warnings():  # multivariate TPE is "experimental" and warns on every use
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed + trials_so_far, multivariate=True,
                                          n_startup_trials=min(10, max(2, budget.trials // 3)))


def open_study(storage: Path, study: str, config: PipelineConfig, budget: SearchBudget) -> optuna.Study:
    """Create the study or load it; a loaded one must have searched the same model and metric and
    scored its trials the same way (``select_window``: values of two windows do not compare)."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=budget.prune_startup_trials,
                                         n_warmup_steps=budget.prune_warmup_epochs)
    result = optuna.create_study(storage=f"sqlite:///{storage}", study_name=study, direction="maximize",
                                 pruner=pruner, load_if_exists=True)
    result.sampler = make_sampler(config.train.seed, len(result.trials), budget)
    identity = {"model": config.model.name, "metric": config.train.metric, "select_window": budget.select_window}
    recorded = {key: result.user_attrs.get(key) for key in identity}
    if not result.trials and not any(recorded.values()):
        for key, value in identity.items():
            result.set_user_attr(key, value)
        return result
    if recorded["select_window"] is None:  # the study predates --select-window: its trials scored single evaluations
        recorded["select_window"] = 1 if result.trials else budget.select_window
        result.set_user_attr("select_window", recorded["select_window"])
    if (recorded["model"], recorded["metric"]) != (identity["model"], identity["metric"]):
        raise TuneError(f"study {study!r} in {storage} searched {recorded['model']} on valid {recorded['metric']}, "
                        f"not {identity['model']} on {identity['metric']}; use another --study")
    if recorded["select_window"] != identity["select_window"]:
        window = recorded["select_window"]
        raise TuneError(f"study {study!r} in {storage} scored its trials with --select-window {window}, not "
                        f"{budget.select_window}: the two do not compare; use --select-window {window} or another --study")
    return result


def requeue_interrupted(study: optuna.Study) -> list[int]:
    """Trials still running when a search starts were left by a killed process (the study lock
    rules out a live one): mark them failed and queue their parameters again."""
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        log.warning("trial %d was left running by an interrupted search: marked failed, its parameters queued again",
                    trial.number)
    return [trial.number for trial in stale]


def _log_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    value = f"{trial.value:.4f}" if trial.value is not None else "-"
    log.info("trial %d %s: valid %s %s after %s epochs (%.1f s)", trial.number, trial.state.name.lower(),
             study.user_attrs.get("metric"), value, trial.user_attrs.get("epochs"), trial.user_attrs.get("seconds", 0.0))


def tune(config: PipelineConfig, budget: SearchBudget, study: str | None = None) -> TuneResult:
    """Run (or resume) the search until the study holds ``budget.trials`` finished trials."""
    if budget.trials < 1:
        raise TuneError(f"--trials must be at least 1 (got {budget.trials})")
    if budget.max_epochs is not None and budget.max_epochs < 1:
        raise TuneError(f"--max-epochs must be at least 1 (got {budget.max_epochs})")
    if budget.prune_warmup_epochs < 0:
        raise TuneError(f"--prune-warmup must be at least 0 (got {budget.prune_warmup_epochs})")
    if budget.select_window < 1:
        raise TuneError(f"--select-window must be at least 1 (got {budget.select_window})")
    study = study or config.model.name
    try:
        check_run_id(study, "study name")  # it names files and run folders
    except RunIdError as err:
        raise TuneError(str(err)) from None
    space = search_space(config.model.name, config.model)
    storage, overlay_path = study_paths(config, study)  # the lock below creates their folder
    try:
        with exclusive_lock(storage.with_suffix(".lock")):
            handle = open_study(storage, study, config, budget)
            if not handle.trials:
                handle.enqueue_trial(starting_point(config, space), user_attrs={"note": "the config's values"})
            requeue_interrupted(handle)
            remaining = budget.trials - len(handle.get_trials(deepcopy=False, states=FINISHED))
            if remaining > 0:
                log.info("study %s: %d of %d trials to go (%s)", study, remaining, budget.trials, storage)
                handle.optimize(_objective(config, space, study, budget), n_trials=remaining,
                                timeout=budget.timeout_s, callbacks=[_log_trial], gc_after_trial=False)
            return summarize(handle, storage, overlay_path, config, space)
    except LockBusy as err:
        raise TuneError(f"study {study!r} is being searched by another process ({err.holder})") from None


# ------------------------------------------------------------------------------------ outputs
def _summary(trial: FrozenTrial) -> TrialSummary:
    value = trial.value if trial.value is not None and math.isfinite(trial.value) else None
    note = trial.user_attrs.get("note", "")
    if "retry_of" in trial.user_attrs:
        note = f"{note}; " if note else ""
        note += f"retry of {trial.user_attrs['retry_of']}"
    return TrialSummary(trial.number, trial.state.name.lower(), value, dict(trial.params),
                        trial.user_attrs.get("epochs"), trial.user_attrs.get("best_epoch"),
                        trial.user_attrs.get("seconds"), note)


def summarize(study: optuna.Study, storage: Path, overlay_path: Path, config: PipelineConfig,
              space: SearchSpace) -> TuneResult:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    result = TuneResult(study.study_name, storage, config.train.metric, space, [_summary(t) for t in trials],
                        best=None, overlay_path=None, epoch_caps=_recorded(trials, "max_epochs"),
                        prune_warmups=_recorded(trials, "prune_warmup"),
                        select_window=study.user_attrs.get("select_window", 1))
    if complete:
        best = study.best_trial
        result.best, result.overlay = _summary(best), nest(best.params)
        result.overlay_path = overlay_path
        write_text_atomic(overlay_path, overlay_text(result, config))
    return result


def _recorded(trials: list[FrozenTrial], attr: str) -> list[int]:
    """The distinct values of a per-trial budget setting over the study (a resumed study may mix them)."""
    return sorted({t.user_attrs[attr] for t in trials if attr in t.user_attrs})


def budget_line(result: TuneResult) -> str:
    """The budget beside every tuned number: trials by state, the epoch cap per trial, the epoch
    pruning may start at, and how a trial is scored."""
    caps, warmups = ("/".join(map(str, values)) or "?" for values in (result.epoch_caps, result.prune_warmups))
    scored = f", a trial scored by its best mean over {result.select_window} evaluations" if result.select_window > 1 else ""
    return (f"{result.count('complete', 'pruned')} finished trials ({result.count('complete')} complete, "
            f"{result.count('pruned')} pruned, {result.count('fail')} failed), at most {caps} epochs per trial, "
            f"TPE + median pruning from epoch {warmups} on valid {result.metric}{scored}")


def score_label(result: TuneResult) -> str:
    """What a trial's value is, in words."""
    if result.select_window > 1:
        return f"(its best mean over {result.select_window} consecutive evaluations)"
    return "(its best evaluation)"


def overlay_text(result: TuneResult, config: PipelineConfig) -> str:
    assert result.best is not None
    header = [
        f"diffcl tune: best trial of study {result.study!r} ({config.model.name} on {config.dataset.name})",
        f"trial {result.best.number}: valid {result.metric} {result.best.value:.4f} {score_label(result)}, best epoch "
        f"{result.best.best_epoch} of {result.best.epochs} (the test split was not evaluated)",
        f"budget: {budget_line(result)}",
        "use: diffcl train CONFIG --overlay THIS_FILE",
    ]
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(result.overlay, sort_keys=False)
