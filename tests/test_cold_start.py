"""The cold-start (new-item) protocol: prepare.held_out_items moves a share of the items wholly out
of training, train.negatives trained_items keeps them out of the sampler and starts their ID rows
at zero, and the evaluator ranks the new items alone for cold_recall@K / cold_ndcg@K and counts
their share of the full top K (new_share@K). Tiny synthetic data throughout."""

import json
import math

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from diffcl.core.workspace import DatasetDirs
from diffcl.data import InteractionData
from diffcl.training.errors import TrainError
from diffcl.training.evaluator import Evaluator
from diffcl.training.run import build_run
from diffcl.training.sampler import BPRSampler, negative_candidates
from features.records import DataError
from pipeline.prepare import prepare
from tests.test_metrics import interaction_data, random_splits
from tests.test_multimodal import FAST

KS = [1, 5, 10, 20]
PROTOCOL = ["train.negatives=trained_items"]


def _prepared(config):
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    stats = json.loads((dirs.prepared / "stats.json").read_text())
    return pl.read_parquet(dirs.prepared / "interactions.parquet"), stats


def test_held_out_items_leave_training_whole_half_to_valid_half_to_test(demo_cold_start, demo_workspace):
    frame, stats = _prepared(demo_cold_start())
    trained = set(frame.filter(pl.col("split") == "train").get_column("item").to_list())
    new = frame.filter(~pl.col("item").is_in(list(trained)))
    splits_per_item = new.group_by("item").agg(pl.col("split").unique())
    assert splits_per_item.height == stats["held_out_items"] == round(0.2 * frame.get_column("item").n_unique())
    # The warm items keep the usual protocol's split, pair for pair.
    usual, usual_stats = _prepared(demo_workspace())
    warm = frame.filter(pl.col("item").is_in(list(trained))).select("user", "item", "split").sort("user", "item")
    assert warm.equals(usual.filter(pl.col("item").is_in(list(trained))).select("user", "item", "split").sort("user", "item"))
    # Every interaction of a held-out item in one split: validation and test ask about different items.
    assert splits_per_item.get_column("split").list.len().max() == 1
    per_split = new.group_by("split").agg(pl.col("item").n_unique()).sort("split")
    assert dict(per_split.iter_rows()) == {"valid": stats["held_out_items"] // 2,
                                          "test": stats["held_out_items"] - stats["held_out_items"] // 2}
    # The usual protocol holds nothing out, and its stats say nothing of it.
    assert "held_out_items" not in usual_stats
    assert set(usual.get_column("item").to_list()) == set(
        usual.filter(pl.col("split") == "train").get_column("item").to_list())


def test_held_out_items_count_only_those_left_with_an_interaction_once_cold_users_are_dropped(tmp_path, caplog):
    """Items 0-7 are each the only item of two users: held out, those users have nothing to train
    on and are dropped, and the item with them. Items 8-19 are shared by ten users."""
    rows = [(2 * i + j, i, 0) for i in range(8) for j in range(2)]
    rows += [(100 + u, i, (0, 0, 1, 2)[(u + i) % 4]) for u in range(10) for i in range(8, 20)]
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "toy.inter").write_text("userID\titemID\tx_label\n" + "".join(f"{u}\t{i}\t{x}\n" for u, i, x in rows))
    from diffcl.core.config import load_config

    config = load_config({"workspace": str(tmp_path / "ws"), "dataset": {"name": "toy", "source": "mmrec", "path": str(folder)}},
                         ["prepare.held_out_items=0.2"])
    with caplog.at_level("INFO", logger="pipeline.prepare"):
        stats = prepare(config, progress=False).stats
    frame, _ = _prepared(config)
    trained = set(frame.filter(pl.col("split") == "train").get_column("item").to_list())
    evaluated_new = frame.filter(~pl.col("item").is_in(list(trained))).get_column("item").n_unique()
    # prepare.seed's draw holds out two lone-user items and two shared ones: a change of the draw
    # that breaks this needs new test data, not a looser assertion.
    assert stats["cold_start_users"] > 0 and 0 < stats["held_out_items"] == evaluated_new < 4
    assert "held out 4 item(s)" in caplog.text and f"{evaluated_new} of them keep" in caplog.text


def test_a_share_too_small_to_hold_out_two_items_names_the_key(demo_workspace):
    config = demo_workspace("prepare.held_out_items=0.0001")
    with pytest.raises(DataError, match=r"prepare.held_out_items 0.0001 holds out 0 of \d+ items"):
        prepare(config, progress=False)


def test_trained_items_negatives_never_draw_an_item_without_a_training_interaction():
    rng = np.random.default_rng(0)
    dense = rng.random((50, 30)) < 0.3
    dense[:, [3, 17, 29]] = False  # new items
    train = sp.csr_matrix(dense.astype(np.float32))
    assert negative_candidates(train, "all_items") is None
    candidates = negative_candidates(train, "trained_items")
    assert set(candidates.tolist()) == set(range(30)) - {3, 17, 29}
    negatives = np.concatenate([b[2].numpy() for b in BPRSampler(train, 64, seed=1, candidates=candidates).epoch()])
    assert not np.isin(negatives, [3, 17, 29]).any()
    everything = np.concatenate([b[2].numpy() for b in BPRSampler(train, 64, seed=1).epoch()])
    assert np.isin(everything, [3, 17, 29]).any()  # the usual protocol draws them
    with pytest.raises(ValueError, match="train.negatives must be"):
        negative_candidates(train, "popular")


def _data_with_new_items(seed: int, new=(2, 9, 20, 31, 40, 44)) -> InteractionData:
    """random_splits with every interaction of the first half of ``new`` in valid, of the rest in test."""
    split = random_splits(seed)
    held = np.array(new)
    for part, items in ((1, held[: len(held) // 2]), (2, held[len(held) // 2 :])):
        split[:, items] = np.where(split[:, items] >= 0, part, -1)
    return interaction_data(split)


def reference_cold_metrics(scores: np.ndarray, data: InteractionData, split: str) -> dict[str, float]:
    """Per user with a relevant new item: the unseen new items sorted by score, textbook recall and NDCG."""
    relevant = data.valid if split == "valid" else data.test
    seen = data.train if split == "valid" else (data.train + data.valid).tocsr()
    new = set(data.new_items.tolist())
    totals = {f"cold_{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in KS}
    users = 0
    for u in range(data.n_users):
        rel = set(relevant[u].indices.tolist()) & new
        if not rel:
            continue
        users += 1
        candidates = [i for i in sorted(new) if i not in set(seen[u].indices.tolist())]
        ranking = sorted(candidates, key=lambda i: -scores[u, i])
        for k in KS:
            hits = [1 if i in rel else 0 for i in ranking[:k]]
            totals[f"cold_recall@{k}"] += sum(hits) / len(rel)
            idcg = sum(1 / math.log2(pos + 2) for pos in range(min(len(rel), k)))
            totals[f"cold_ndcg@{k}"] += sum(h / math.log2(pos + 2) for pos, h in enumerate(hits)) / idcg
    return {name: value / users for name, value in totals.items()}


def reference_new_share(scores: np.ndarray, data: InteractionData, split: str) -> dict[str, float]:
    """Per user of the split: the share of the top-K unseen items, ranked among all items, that are new."""
    relevant = data.valid if split == "valid" else data.test
    seen = data.train if split == "valid" else (data.train + data.valid).tocsr()
    new = set(data.new_items.tolist())
    users = [u for u in range(data.n_users) if relevant[u].nnz]
    totals = dict.fromkeys(KS, 0.0)
    for u in users:
        ranking = sorted(set(range(data.n_items)) - set(seen[u].indices.tolist()), key=lambda i: -scores[u, i])
        for k in KS:
            totals[k] += sum(i in new for i in ranking[:k]) / k
    return {f"new_share@{k}": value / len(users) for k, value in totals.items()}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_cold_metrics_rank_the_new_items_alone(seed, split):
    data = _data_with_new_items(seed)
    rng = np.random.default_rng(300 + seed)
    users = torch.tensor(rng.normal(size=(data.n_users, 8)), dtype=torch.float32)
    items = torch.tensor(rng.normal(size=(data.n_items, 8)), dtype=torch.float32)
    evaluator = Evaluator(data, KS, batch_users=7, head_share=0.2)
    got = evaluator.evaluate(users, items, split)
    assert evaluator.reported_metrics(split) == set(got)  # what training checks its metric against
    want = reference_cold_metrics((users @ items.T).numpy(), data, split)
    # The candidates are all six new items (both splits' halves): K above six is not reported.
    assert {name for name in got if name.startswith("cold_")} == {f"cold_{m}@{k}" for m in ("recall", "ndcg") for k in (1, 5)}
    assert 0 < want["cold_recall@1"] < want["cold_recall@5"] < 1
    for name in got:
        if name.startswith("cold_"):
            assert got[name] == pytest.approx(want[name], abs=1e-5), name
    # The new items' share of the full ranking's top K, over every user of the split.
    shares = reference_new_share((users @ items.T).numpy(), data, split)
    assert 0 < shares["new_share@20"] < 1
    for name, value in shares.items():
        assert got[name] == pytest.approx(value, abs=1e-5), name
    # Where every item has a training interaction nothing cold is reported.
    warm = Evaluator(InteractionData(data.n_users, data.n_items, data.train + data.valid + data.test, data.valid,
                                     data.test), KS)
    warm_metrics = warm.evaluate(users, items, split)
    assert not any(name.startswith(("cold_", "new_share")) for name in warm_metrics)
    assert warm.reported_metrics(split) == set(warm_metrics)


@pytest.mark.parametrize("model", ["mf", "lightgcn", "freedom", "diffcl"])
def test_new_items_start_with_zero_id_rows_and_the_others_as_before(demo_cold_start, model):
    usual = build_run(demo_cold_start("train.epochs=1", f"model.name={model}"), run_id=f"init-{model}").model
    cold = build_run(demo_cold_start("train.epochs=1", f"model.name={model}", *PROTOCOL), run_id=f"init-{model}-c").model
    config = demo_cold_start()
    degrees = InteractionData.load(DatasetDirs.of(config.workspace, config.dataset.name).prepared).item_degrees
    table = {"mf": "item_emb", "diffcl": "item_id"}.get(model, "ego")  # ego: users then items
    before, after = getattr(usual, table).detach(), getattr(cold, table).detach()
    rows = torch.as_tensor(np.flatnonzero(degrees == 0)) + (before.shape[0] - len(degrees))  # ego: users first
    assert len(rows) > 0
    assert after[rows].abs().sum() == 0 and before[rows].abs().sum() > 0
    keep = torch.ones(before.shape[0], dtype=torch.bool)
    keep[rows] = False
    assert torch.equal(before[keep], after[keep])


def _random_cold_recall(evaluator: Evaluator, seeds: int = 5) -> float:
    values = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        values.append(evaluator.evaluate(torch.randn(evaluator.data.n_users, 16, generator=g),
                                         torch.randn(evaluator.data.n_items, 16, generator=g), "test")["cold_recall@20"])
    return float(np.mean(values))


def test_content_models_recommend_new_items_and_an_id_model_cannot(demo_cold_start):
    """On items never seen in training, DiffCL ranks by content (planted: an item's group is in its
    features) and LightGCN has only zero rows: DiffCL well above chance, LightGCN not."""
    recalls = {}
    for model in ("diffcl", "lightgcn"):
        trainer = build_run(demo_cold_start(*FAST, f"model.name={model}", *PROTOCOL), run_id=f"cold-{model}")
        recalls[model] = trainer.fit().metrics["test"]["cold_recall@20"]
    chance = _random_cold_recall(trainer.evaluator)
    assert recalls["diffcl"] > 1.5 * chance and recalls["diffcl"] > 1.5 * recalls["lightgcn"], (recalls, chance)
    # Zero rows: every new item ties, ranked in a fixed order that knows nothing of the users.
    assert recalls["lightgcn"] < 1.2 * chance, (recalls, chance)


def test_from_content_gives_new_items_the_mean_of_their_projected_features_as_id_rows(demo_cold_start):
    setting = "model.diffcl.new_item_id=from_content"
    model = build_run(demo_cold_start("train.epochs=1", "model.name=diffcl", *PROTOCOL, setting), run_id="fc").model
    new = model.content_id_items
    assert len(new) > 0
    rows = model.id_items()
    want = torch.stack([model.project(m, new) for m in model.modalities]).mean(dim=0)
    assert torch.allclose(rows[new], want)
    keep = torch.ones(len(rows), dtype=torch.bool)
    keep[new] = False
    assert torch.equal(rows[keep], model.item_id[keep])
    # The content path trains the projections through the ID branch as well.
    rows[new].sum().backward()
    for m in model.modalities:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projections[m].parameters()), m
    # The scores read the ID branch through id_items(): with the set emptied, the new items' ID rows
    # are the zero rows and their embeddings change; the warm items' do not.
    with torch.no_grad():
        _, items_from_content = model.embeddings()
        saved, model.content_id_items = model.content_id_items, model.content_id_items[:0]
        _, items_zero = model.embeddings()
        model.content_id_items = saved
    assert not torch.allclose(items_from_content[new], items_zero[new])
    # Without the protocol there is no new item, and the setting changes nothing.
    usual = build_run(demo_cold_start("train.epochs=1", "model.name=diffcl", setting), run_id="fc-usual").model
    assert len(usual.content_id_items) == 0 and usual.id_items() is usual.item_id


def test_scaled_content_rows_point_where_the_content_does_at_a_multiple_of_the_trained_rows_mean_length(demo_cold_start):
    settings = ["model.diffcl.new_item_id=from_content_scaled", "model.diffcl.new_item_length=2.5"]
    model = build_run(demo_cold_start("train.epochs=1", "model.name=diffcl", *PROTOCOL, *settings), run_id="fcs").model
    new = model.content_id_items
    assert len(new) > 0
    with torch.no_grad():
        model.item_id.mul_(7.0)  # trained rows far longer than the projections, as measured on real data
    rows = model.id_items()
    keep = torch.ones(len(rows), dtype=torch.bool)
    keep[new] = False
    direction = torch.stack([model.project(m, new) for m in model.modalities]).mean(dim=0)
    assert torch.allclose(torch.nn.functional.normalize(rows[new], dim=1), torch.nn.functional.normalize(direction, dim=1),
                          atol=1e-6)
    assert torch.allclose(rows[new].norm(dim=1), 2.5 * model.item_id[keep].norm(dim=1).mean().expand(len(new)))
    assert torch.equal(rows[keep], model.item_id[keep])
    # The length is a statistic of the trained rows, not a path for their gradients.
    rows[new].sum().backward()
    assert model.item_id.grad is None or model.item_id.grad[keep].abs().sum() == 0


def test_the_new_items_of_a_checkpoint_are_its_own_and_older_checkpoints_load(demo_cold_start):
    """Rescored on later data, a model keeps content rows for the items that were new when it trained."""
    setting = "model.diffcl.new_item_id=from_content"
    trained = build_run(demo_cold_start("train.epochs=1", "model.name=diffcl", *PROTOCOL, setting), run_id="fc-a").model
    other = build_run(demo_cold_start("train.epochs=1", "model.name=diffcl", *PROTOCOL, setting), run_id="fc-b").model
    built = other.content_id_items.clone()
    state = trained.state_dict()
    state["content_id_items"] = state["content_id_items"][:3]  # as if trained when only these were new
    other.load_state_dict(state)
    assert torch.equal(other.content_id_items, trained.content_id_items[:3]) and len(built) > 3
    other.content_id_items = built.clone()
    del state["content_id_items"]  # a checkpoint from before the set was saved: the built set stays
    other.load_state_dict(state)
    assert torch.equal(other.content_id_items, built)


def test_selecting_on_a_metric_the_data_do_not_report_names_the_key(demo_multimodal):
    trainer = build_run(demo_multimodal("train.epochs=1", "model.name=mf", "train.metric=cold_recall@20"), run_id="no-cold")
    with pytest.raises(TrainError, match=r"train.metric 'cold_recall@20' is not among the validation metrics"):
        trainer.fit()
    assert trainer.epoch == 0 and not trainer.run_dir.exists()  # said before any training or run folder


def test_a_publish_metric_the_data_do_not_report_is_refused_before_training(demo_multimodal):
    from pipeline.publish import PublishError
    from pipeline.train import train_resuming

    config = demo_multimodal("train.epochs=1", "model.name=mf", "publish.metric=cold_ndcg@20")
    with pytest.raises(PublishError, match=r"publish.metric 'cold_ndcg@20' is not among the run's validation metrics"):
        train_resuming(config, "no-cold-publish")
    assert not (DatasetDirs.of(config.workspace, config.dataset.name).runs / "no-cold-publish").exists()
