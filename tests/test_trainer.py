import json

import numpy as np
import polars as pl
import pytest
import torch

from diffcl.core.config import ConfigError
from diffcl.training.errors import TrainError
from diffcl.training.evaluator import Evaluator, evaluate_model
from diffcl.training.run import build_run, load_model, train
from diffcl.training.trainer import Trainer

FAST = ["train.epochs=30", "train.batch_size=512", "train.lr=0.01", "train.patience=5", "train.threads=2"]


class Interrupt(Exception):
    """A kill in the middle of training, raised from the trainer's on_epoch hook."""


def stop_after(epoch: int):
    def on_epoch(row):
        if row["epoch"] == epoch:
            raise Interrupt
    return on_epoch


def random_recall(trainer: Trainer, seeds: int = 5) -> float:
    values = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        users = torch.randn(trainer.evaluator.data.n_users, 16, generator=g)
        items = torch.randn(trainer.evaluator.data.n_items, 16, generator=g)
        values.append(trainer.evaluator.evaluate(users, items, "test")["recall@20"])
    return float(np.mean(values))


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_short_train_beats_random_by_a_wide_margin(demo_workspace, model):
    config = demo_workspace(*FAST, f"model.name={model}")
    trainer = build_run(config, run_id=f"beat-{model}")
    result = trainer.fit()
    test = result.metrics["test"]["recall@20"]
    baseline = random_recall(trainer)
    assert test > 2.5 * baseline, (test, baseline)


def test_run_folder_contents(demo_workspace):
    config = demo_workspace(*FAST, "train.epochs=3")
    result = train(config, run_id="outputs")
    run = result.run_dir
    for name in ("config.yaml", "history.parquet", "best.pt", "last.pt", "curves.png", "metrics.json"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert {f"{m}@{k}" for m in ("recall", "ndcg", "precision", "map", "hit") for k in (5, 10, 20, 50)} <= set(metrics[split])
    assert {"best_epoch", "epoch_seconds", "eval_seconds"} <= set(metrics)
    history = pl.read_parquet(run / "history.parquet")
    assert history.height == 3 and {"loss", "bpr", "reg", "train_seconds", "valid_recall@20"} <= set(history.columns)
    state = torch.load(run / "best.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_resume_after_interrupt_matches_uninterrupted_run(demo_workspace, ema):
    overrides = [*FAST, "train.epochs=6", "model.name=lightgcn", f"train.ema_decay={ema}"]
    full = train(demo_workspace(*overrides), run_id=f"full-ema{ema}")

    with pytest.raises(Interrupt):
        build_run(demo_workspace(*overrides), run_id=f"resumed-ema{ema}", on_epoch=stop_after(3)).fit()
    resumed = build_run(demo_workspace(*overrides), run_id=f"resumed-ema{ema}").fit()
    assert resumed.metrics["best_epoch"] == full.metrics["best_epoch"]
    assert resumed.metrics["test"] == pytest.approx(full.metrics["test"], abs=1e-7)
    a = torch.load(full.run_dir / "best.pt", weights_only=True)
    b = torch.load(resumed.run_dir / "best.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if ema != "0":  # the average itself went on from where it was interrupted
        a, b = (torch.load(r.run_dir / "last.pt", weights_only=True)["weight_average"] for r in (full, resumed))
        assert a["steps"] == b["steps"] and all(torch.equal(a["average"][k], b["average"][k]) for k in a["average"])


def test_resume_with_another_config_is_refused(demo_workspace):
    train(demo_workspace(*FAST, "train.epochs=1"), run_id="cfg")
    with pytest.raises(TrainError, match="another config"):
        train(demo_workspace(*FAST, "train.epochs=2", "train.lr=0.5"), run_id="cfg")


def test_resume_of_a_run_started_before_a_config_field_existed(demo_workspace):
    # A field added since (at its default) is no change; a config this version cannot read is refused.
    import yaml

    overrides = [*FAST, "train.epochs=2", "model.name=mf"]
    with pytest.raises(Interrupt):
        build_run(demo_workspace(*overrides), run_id="older", on_epoch=stop_after(1)).fit()
    path = demo_workspace().workspace / "demo/runs/older/config.yaml"
    recorded = yaml.safe_load(path.read_text())
    del recorded["train"]["ema_decay"]
    path.write_text(yaml.safe_dump(recorded))
    assert train(demo_workspace(*overrides), run_id="older").metrics["epochs"] == 2
    recorded["train"]["unknown_knob"] = 1
    path.write_text(yaml.safe_dump(recorded))
    with pytest.raises(TrainError, match="not a config this version reads"):
        train(demo_workspace(*overrides, "train.epochs=3"), run_id="older")


def test_early_stopping_and_best_epoch(demo_workspace):
    # A learning rate this high overfits fast: training must stop by patience, not by epochs.
    result = train(demo_workspace("train.epochs=200", "train.patience=3", "train.lr=0.5", "model.name=mf",
                                  "train.batch_size=256"), run_id="early")
    assert result.metrics["epochs"] < 200
    assert result.metrics["epochs"] - result.metrics["best_epoch"] == 3


def test_unknown_model_is_a_clear_error(demo_workspace):
    # Checked when the config loads, before any stage runs.
    with pytest.raises(ConfigError, match="model.name: .*unknown model 'nope'"):
        demo_workspace("model.name=nope")


@pytest.mark.parametrize("ema", ["0", "0.9"])
def test_load_model_and_evaluate_again(demo_workspace, ema):
    # With a weight average, best.pt holds the averaged weights that validation scored.
    result = train(demo_workspace(*FAST, "train.epochs=2", f"train.ema_decay={ema}"), run_id=f"reload-ema{ema}")
    loaded = load_model(result.run_dir)
    assert evaluate_model(loaded.model, loaded.evaluator, "test") == pytest.approx(result.metrics["test"])
    assert isinstance(loaded.evaluator, Evaluator)


def test_trainer_trains_on_in_memory_data_without_a_run_folder(tmp_path, monkeypatch):
    """Issue 12: the trainer takes its parts ready-made; nothing is read or written on disk."""
    from diffcl.core.config import load_config
    from diffcl.data import InteractionData
    from diffcl.models import ModelContext, build_model
    from diffcl.training.sampler import BPRSampler

    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    # Two planted groups: users of a group interact with the items of that group only.
    rows = [(u, i) for u in range(40) for i in rng.choice(np.arange(15) + 15 * (u % 2), 8, replace=False)]
    split = ["train"] * 6 + ["valid", "test"]
    frame = pl.DataFrame({"user": [u for u, _ in rows], "item": [int(i) for _, i in rows],
                          "split": split * 40})
    data = InteractionData.from_frame(frame, 40, 30)
    config = load_config({"dataset": {"name": "mem", "source": "mmrec", "path": str(tmp_path)}},
                         ["model.name=lightgcn", "train.epochs=15", "train.batch_size=64", "eval.topk=[5]",
                          "train.metric=recall@5", "publish.metric=recall@5"])
    torch.manual_seed(0)
    model = build_model("lightgcn", ModelContext(data=data), config.model)
    trainer = Trainer(model, BPRSampler(data.train, 64, 0), Evaluator(data, [5]), config.train)
    result = trainer.fit()
    assert result.run_dir is None and list(tmp_path.iterdir()) == []
    # A random ranking finds the one test item among a user's unseen items with probability 5/unseen.
    unseen = data.n_items - np.diff((data.train + data.valid).tocsr().indptr)
    assert result.metrics["test"]["recall@5"] > 2 * float(np.mean(5 / unseen))


def test_weight_average_follows_the_steps_and_is_only_lent_for_evaluation():
    from diffcl.training.averaging import WeightAverage

    model = torch.nn.Linear(3, 2)
    model.register_buffer("graph", torch.ones(2))
    average = WeightAverage(model, decay=0.5)
    expected = {name: p.detach().clone() for name, p in model.named_parameters()}
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        decay = min(0.5, (1 + step) / (10 + step))  # the warm-up, then the decay
        for name, p in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach()
        average.update()
    own = {name: p.detach().clone() for name, p in model.named_parameters()}
    with average.applied():
        for name, p in model.named_parameters():
            assert torch.allclose(p, expected[name]) and not torch.allclose(p, own[name])
        model.graph.mul_(3)  # buffers are the live ones, not averaged or restored
    assert all(torch.equal(p, own[name]) for name, p in model.named_parameters())
    assert torch.equal(model.graph, torch.full((2,), 3.0))
    restored = WeightAverage(model, decay=0.5)
    restored.load_state_dict(average.state_dict())
    assert restored.steps == 4 and all(torch.equal(a, b) for a, b in zip(restored.average, average.average, strict=True))


def test_weight_average_decay_out_of_range_is_a_config_error(demo_workspace):
    with pytest.raises(ConfigError, match="train.ema_decay"):
        demo_workspace("train.ema_decay=1")


def test_validation_and_best_weights_are_the_weight_average(demo_workspace):
    overrides = [*FAST, "train.epochs=1", "model.name=lightgcn"]
    raw = train(demo_workspace(*overrides), run_id="avg-raw")
    averaged = train(demo_workspace(*overrides, "train.ema_decay=0.9"), run_id="avg-ema")
    # The average does not touch training (the same steps, the same losses); validation scores it.
    assert raw.history["loss"].to_list() == averaged.history["loss"].to_list()
    assert raw.history["valid_recall@20"].to_list() != averaged.history["valid_recall@20"].to_list()
    best = torch.load(averaged.run_dir / "best.pt", weights_only=True)
    last = torch.load(averaged.run_dir / "last.pt", weights_only=True)
    mean = last["weight_average"]["average"]
    assert mean and all(torch.equal(best[name], value) for name, value in mean.items())
    assert not all(torch.equal(last["model"][name], value) for name, value in mean.items())


def test_in_batch_softmax_masks_the_users_own_positives_and_equals_cross_entropy():
    from diffcl.models.base import Batch, in_batch_softmax_loss

    # Users 0 and 1 are one user; item 7 is user 0's positive again among the negatives.
    batch = Batch(torch.tensor([3, 3, 5]), torch.tensor([7, 8, 9]), torch.tensor([7, 2, 4]))
    g = torch.Generator().manual_seed(0)
    users, pos, neg = (torch.randn(3, 4, generator=g, requires_grad=True) for _ in range(3))
    loss = in_batch_softmax_loss(batch, users, pos, neg, temperature=0.5)
    logits = users @ torch.cat([pos, neg]).T / 0.5
    kept = [[0, 2, 4, 5], [1, 2, 3, 4, 5], [2, 0, 1, 3, 4, 5]]  # each row's own positive first
    expected = torch.stack([-torch.log_softmax(logits[i, cols], 0)[0] for i, cols in enumerate(kept)]).mean()
    assert torch.allclose(loss, expected)
    grads = torch.autograd.grad(loss, (users, pos, neg))
    expected_grads = torch.autograd.grad(expected, (users, pos, neg))
    assert all(torch.allclose(a, b) for a, b in zip(grads, expected_grads, strict=True))  # masked logits carry no gradient


def test_logq_correction_subtracts_each_candidates_log_chance():
    from diffcl.data import InteractionData
    from diffcl.models.base import Batch, candidate_log_probability, in_batch_softmax_loss

    # Four items; item 0 has 3 of the 4 interactions: q = ½·¾ + ½·¼ = ½; item 1: ½·¼ + ⅛ = ¼; the rest ⅛.
    frame = pl.DataFrame({"user": [0, 0, 1, 2], "item": [0, 1, 0, 0], "split": ["train"] * 4})
    log_q = candidate_log_probability(InteractionData.from_frame(frame, n_users=3, n_items=4).item_degrees)
    assert torch.allclose(log_q.exp(), torch.tensor([0.5, 0.25, 0.125, 0.125]))
    # Negatives among the trained items only (items 0 and 1): ½·¾ + ¼, ½·¼ + ¼; 2 and 3 never candidates.
    trained_only = candidate_log_probability(InteractionData.from_frame(frame, n_users=3, n_items=4).item_degrees,
                                              np.array([2, 3]))
    assert torch.allclose(trained_only[:2].exp(), torch.tensor([0.625, 0.375])) and torch.isfinite(trained_only).all()
    batch = Batch(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([2, 2]))
    g = torch.Generator().manual_seed(1)
    users, pos, neg = (torch.randn(2, 4, generator=g) for _ in range(3))
    corrected = in_batch_softmax_loss(batch, users, pos, neg, 1.0, log_q)
    logits = users @ torch.cat([pos, neg]).T - log_q[torch.tensor([0, 1, 2, 2])]
    assert torch.allclose(corrected, torch.nn.functional.cross_entropy(logits, torch.arange(2)))
    assert not torch.allclose(corrected, in_batch_softmax_loss(batch, users, pos, neg, 1.0))


def test_in_batch_softmax_trains_every_model_part(demo_workspace):
    config = demo_workspace(*FAST, "train.epochs=2", "model.name=lightgcn", "model.ranking_loss=in_batch_softmax",
                            "model.softmax_logq=true")
    trainer = build_run(config, run_id="softmax")
    result = trainer.fit()
    assert {"in_batch_softmax", "reg"} <= set(result.history.columns) and "bpr" not in result.history.columns
    assert trainer.model.candidate_log_q is not None
    assert "candidate_log_q" not in torch.load(result.run_dir / "best.pt", weights_only=True)  # rebuilt, not stored
