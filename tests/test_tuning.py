"""`diffcl tune`: the search, its resume after a kill, pruning, no test split, and overlays."""

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from diffcl.core.config import dump_config, load_config, overlay_overrides, search_space
from diffcl.training.errors import DivergedError
from diffcl.training.evaluator import Evaluator
from diffcl.training.trainer import Trainer
from diffcl.training.tuning import (
    SearchBudget,
    TuneError,
    report_epoch,
    study_paths,
    suggest,
    tune,
    windowed_best,
)
from flows.cli import app

FAST = ["model.name=mf", "train.batch_size=1024", "train.threads=2", "train.patience=2"]
TINY = SearchBudget(trials=2, max_epochs=2)


def spy_on_splits(monkeypatch) -> list[str]:
    """The splits every evaluation asks for, from now on."""
    splits, real = [], Evaluator.evaluate

    def spy(self, user_emb, item_emb, split="valid"):
        splits.append(split)
        return real(self, user_emb, item_emb, split)

    monkeypatch.setattr(Evaluator, "evaluate", spy)
    return splits


def test_search_runs_n_trials_never_reads_test_and_writes_an_overlay_load_config_accepts(demo_workspace, monkeypatch):
    config = demo_workspace(*FAST)
    splits = spy_on_splits(monkeypatch)
    result = tune(config, SearchBudget(trials=3, max_epochs=2), study="basic")
    assert splits and set(splits) == {"valid"}  # the test split is never evaluated during a search
    assert result.count("complete", "pruned") == 3
    assert all(t.epochs <= 2 and set(t.params) == set(search_space("mf")) for t in result.trials)
    # The first trial is the config's own setting: the search never ends below where it started.
    first = result.trials[0]
    assert first.note == "the config's values"
    assert first.params == {"train.lr": config.train.lr, "model.reg_weight": config.model.reg_weight}
    assert result.trials[1].params != first.params
    text = result.overlay_path.read_text()
    assert text.startswith("# diffcl tune") and "3 finished trials" in text and "at most 2 epochs" in text
    overlay = yaml.safe_load(text)
    assert set(overlay) == {"train", "model"}  # only the searched keys, nested
    tuned = load_config(config.model_dump(mode="json"), overlays=[result.overlay_path])
    assert tuned.train.lr == result.best.params["train.lr"]
    assert tuned.model.reg_weight == result.best.params["model.reg_weight"]
    assert tuned.train.epochs == config.train.epochs  # the overlay carries no budget


def test_interrupted_search_resumes_and_requeues_the_killed_trial(demo_workspace):
    config = demo_workspace(*FAST)
    tune(config, TINY, study="resume")
    # A process killed mid-trial leaves the trial RUNNING in the storage.
    storage, _ = study_paths(config, "resume")
    study = optuna.load_study(study_name="resume", storage=f"sqlite:///{storage}")
    killed = study.ask()
    killed_params = suggest(killed, search_space("mf"))

    result = tune(config, SearchBudget(trials=4, max_epochs=2), study="resume")
    states = {t.number: t.state for t in result.trials}
    assert states[killed.number] == "fail"
    assert result.count("complete", "pruned") == 4
    retry, fresh = result.trials[-2:]
    assert retry.params == killed_params and retry.note == f"retry of {killed.number}"
    assert all(fresh.params != t.params for t in result.trials[:2])  # a resumed sampler draws new points
    # Enough finished trials: a rerun trains nothing more.
    assert len(tune(config, SearchBudget(trials=4, max_epochs=2), study="resume").trials) == len(result.trials)


def test_report_epoch_reports_evaluations_and_prunes_when_told():
    class StubTrial:
        def __init__(self, prune):
            self.reports, self.prune = [], prune

        def report(self, value, step):
            self.reports.append((step, value))

        def should_prune(self):
            return self.prune

    keep = StubTrial(prune=False)
    report_epoch(keep, {"epoch": 1, "loss": 0.5}, "recall@20")  # no evaluation this epoch
    report_epoch(keep, {"epoch": 2, "valid_recall@20": 0.3}, "recall@20")
    assert keep.reports == [(2, 0.3)]
    with pytest.raises(optuna.TrialPruned, match="epoch 4"):
        report_epoch(StubTrial(prune=True), {"epoch": 4, "valid_recall@20": 0.01}, "recall@20")


def test_windowed_best_is_the_best_mean_of_consecutive_evaluations():
    noisy = [0.20, 0.31, 0.18, 0.24, 0.25, 0.26, 0.25]  # one lucky epoch
    assert windowed_best(noisy, 1) == 0.31
    assert windowed_best(noisy, 3) == pytest.approx((0.25 + 0.26 + 0.25) / 3)  # the sustained level wins
    assert windowed_best([0.1, 0.3], 5) == pytest.approx(0.2)  # shorter than the window: the mean of all
    with pytest.raises(ValueError, match="no validation value"):
        windowed_best([], 3)


def test_a_windowed_search_scores_each_trial_by_its_curve(demo_workspace):
    import json

    config = demo_workspace(*FAST, "train.patience=3")
    result = tune(config, SearchBudget(trials=2, max_epochs=5, prune_startup_trials=5, select_window=3), study="window")
    assert "a trial scored by its best mean over 3 evaluations" in result.overlay_path.read_text()
    with pytest.raises(TuneError, match="scored its trials with --select-window 3, not 1"):
        tune(config, SearchBudget(trials=3, max_epochs=5), study="window")  # values of two windows do not compare
    runs = config.workspace / config.dataset.name / "runs"
    for trial in result.trials:
        history = json.loads((runs / f"tune-window-{trial.number}" / "history.json").read_text())
        curve = [row[f"valid_{config.train.metric}"] for row in history if f"valid_{config.train.metric}" in row]
        assert trial.value == pytest.approx(windowed_best(curve, 3))
        assert len(curve) >= 3


def test_a_curve_far_below_the_others_is_pruned():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=2))

    def curve(values):
        def objective(trial):
            for epoch, value in enumerate(values, start=1):
                report_epoch(trial, {"epoch": epoch, "valid_recall@20": value}, "recall@20")
            return max(values)
        return objective

    study.optimize(curve([0.2, 0.3, 0.35, 0.4]), n_trials=1)
    study.optimize(curve([0.01, 0.02, 0.02, 0.03]), n_trials=1)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.PRUNED]
    assert study.trials[1].last_step == 2  # pruned at the first evaluation the warm-up allows


def test_a_diverged_trial_is_pruned_not_fatal(demo_workspace, monkeypatch):
    def diverge(self):
        raise DivergedError("non-finite loss at epoch 1")

    monkeypatch.setattr(Trainer, "train_epoch", diverge)
    result = tune(demo_workspace(*FAST), SearchBudget(trials=1, max_epochs=2), study="diverged")
    assert [(t.state, t.note) for t in result.trials] == [("pruned", "diverged")]
    assert result.best is None and result.overlay_path is None


def test_overlay_merges_before_set(tmp_path):
    overlay = tmp_path / "best.yaml"
    overlay.write_text("train: {lr: 0.05, epochs: 7}\nmodel: {lightgcn: {layers: 3}}\n")
    source = {"dataset": {"name": "x", "source": "tables", "interactions": "i.csv"}, "train": {"batch_size": 64}}
    config = load_config(source, ["train.lr=0.2"], overlays=[overlay])
    assert (config.train.lr, config.train.epochs, config.train.batch_size) == (0.2, 7, 64)
    assert config.model.lightgcn.layers == 3 and config.model.lightgcn.combine == "mean"
    # The --set list printed for an overlay (and handed to the flow by `diffcl run`) is the same config.
    as_sets = overlay_overrides(yaml.safe_load(overlay.read_text()))
    assert as_sets == ["train.lr=0.05", "train.epochs=7", "model.lightgcn.layers=3"]
    assert load_config(source, [*as_sets, "train.lr=0.2"]) == config
    overlay.write_text("train: {lr: -1}\n")
    with pytest.raises(ValueError, match=r"with overlay .*best.yaml:\n  train.lr"):
        load_config(source, [], overlays=[overlay])


def test_cli_tune_prints_trials_and_the_overlay_as_set(demo_workspace, tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text(dump_config(demo_workspace()))
    overlay = tmp_path / "fast.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"name": "mf"}, "train": {"batch_size": 1024, "threads": 2}}))
    args = ["tune", str(config_file), "--trials", "2", "--max-epochs", "2", "--study", "cli", "--overlay", str(overlay),
            "--prune-warmup", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("study cli", "complete", "2 finished trials", "at most 2 epochs", "pruning from epoch 2",
                 "cli-best.yaml", "--set train.lr="):
        assert text in result.output, text
    bad = CliRunner().invoke(app, [*args[:3], "0"])
    assert bad.exit_code == 2 and "--trials must be at least 1" in bad.output
    bad = CliRunner().invoke(app, [*args, "--max-epochs", "0"])
    assert bad.exit_code == 2 and "--max-epochs must be at least 1" in bad.output
    bad = CliRunner().invoke(app, [*args, "--prune-warmup", "-1"])
    assert bad.exit_code == 2 and "--prune-warmup must be at least 0" in bad.output
    bad = CliRunner().invoke(app, [*args, "--select-window", "0"])
    assert bad.exit_code == 2 and "--select-window must be at least 1" in bad.output
    bad = CliRunner().invoke(app, [*args, "--study", "../x"])
    assert bad.exit_code == 2 and "invalid study name '../x'" in bad.output


def test_a_setting_s_own_keys_are_searched_only_where_it_is_on():
    usual = load_config({"dataset": {"name": "d", "source": "mmrec", "path": "p"}, "model": {"name": "diffcl"}})
    assert "model.diffcl.new_item_length" not in search_space("diffcl", usual.model)
    scaled = load_config(usual.model_dump(mode="json"), overrides=["model.diffcl.new_item_id=from_content_scaled"])
    space = search_space("diffcl", scaled.model)
    assert space["model.diffcl.new_item_length"].low == 0.5
    assert set(space) - {"model.diffcl.new_item_length"} == set(search_space("diffcl"))
