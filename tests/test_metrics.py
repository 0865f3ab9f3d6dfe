"""The evaluator against a slow, obvious reference implementation on random data."""

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffcl.data import InteractionData
from diffcl.training.evaluator import Evaluator

KS = [1, 5, 10, 20]


def reference_metrics(scores: np.ndarray, data: InteractionData, split: str) -> dict[str, float]:
    """Rank every item per user with Python sorting, then apply the textbook definitions."""
    relevant = data.valid if split == "valid" else data.test
    seen = data.train if split == "valid" else (data.train + data.valid).tocsr()
    totals = {f"{m}@{k}": 0.0 for m in ("recall", "ndcg", "precision", "map", "hit") for k in KS}
    users = 0
    for u in range(data.n_users):
        rel = set(relevant[u].indices.tolist())
        if not rel:
            continue
        users += 1
        masked = set(seen[u].indices.tolist())
        candidates = [i for i in range(data.n_items) if i not in masked]
        ranking = sorted(candidates, key=lambda i: -scores[u, i])
        for k in KS:
            top = ranking[:k]
            hits = [1 if i in rel else 0 for i in top]
            n_hit = sum(hits)
            totals[f"recall@{k}"] += n_hit / len(rel)
            totals[f"precision@{k}"] += n_hit / k
            totals[f"hit@{k}"] += 1.0 if n_hit else 0.0
            dcg = sum(h / math.log2(pos + 2) for pos, h in enumerate(hits))
            idcg = sum(1 / math.log2(pos + 2) for pos in range(min(len(rel), k)))
            totals[f"ndcg@{k}"] += dcg / idcg
            ap, found = 0.0, 0
            for pos, h in enumerate(hits):
                if h:
                    found += 1
                    ap += found / (pos + 1)
            totals[f"map@{k}"] += ap / min(len(rel), k)
    return {name: value / users for name, value in totals.items()}


def random_splits(seed: int, n_users=60, n_items=45) -> np.ndarray:
    """users x items: 0 train, 1 valid, 2 test, -1 no interaction (25% / 7% / 8% of the pairs)."""
    dense = np.random.default_rng(seed).random((n_users, n_items))
    split = np.full((n_users, n_items), -1)
    split[dense < 0.25] = 0
    split[(dense >= 0.25) & (dense < 0.32)] = 1
    split[(dense >= 0.32) & (dense < 0.40)] = 2
    return split


def interaction_data(split: np.ndarray) -> InteractionData:
    return InteractionData(*split.shape, *(sp.csr_matrix((split == s).astype(np.float32)) for s in (0, 1, 2)))


def random_data(seed: int, n_users=60, n_items=45) -> InteractionData:
    split = random_splits(seed, n_users, n_items)
    split[:5, :] = np.where(split[:5, :] == 2, -1, split[:5, :])  # some users without test items
    return interaction_data(split)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("split", ["valid", "test"])
def test_evaluator_matches_reference(seed, split):
    data = random_data(seed)
    rng = np.random.default_rng(100 + seed)
    users = torch.tensor(rng.normal(size=(data.n_users, 8)), dtype=torch.float32)
    items = torch.tensor(rng.normal(size=(data.n_items, 8)), dtype=torch.float32)
    scores = (users @ items.T).numpy()
    got = Evaluator(data, KS, batch_users=7).evaluate(users, items, split)
    want = reference_metrics(scores, data, split)
    assert set(got) == set(want)
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-5), name


def reference_tail_recall(scores: np.ndarray, data: InteractionData, split: str, head_share: float) -> dict[str, float]:
    """Long-tail recall by the definition: head = the ceil(share x items) items with the most training
    interactions (ties to the lower item ID), a user counts where one of its relevant items is not head."""
    degree = np.asarray(data.train.sum(axis=0)).ravel()
    order = sorted(range(data.n_items), key=lambda i: (-degree[i], i))
    head = set(order[: math.ceil(head_share * data.n_items)])
    relevant = data.valid if split == "valid" else data.test
    seen = data.train if split == "valid" else (data.train + data.valid).tocsr()
    totals, users = dict.fromkeys(KS, 0.0), 0
    for u in range(data.n_users):
        tail = set(relevant[u].indices.tolist()) - head
        if not tail:
            continue
        users += 1
        masked = set(seen[u].indices.tolist())
        ranking = sorted((i for i in range(data.n_items) if i not in masked), key=lambda i: -scores[u, i])
        for k in KS:
            totals[k] += len(tail & set(ranking[:k])) / len(tail)
    return {f"tail_recall@{k}": value / users for k, value in totals.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_tail_recall_matches_reference(seed):
    data = random_data(seed)
    rng = np.random.default_rng(200 + seed)
    users = torch.tensor(rng.normal(size=(data.n_users, 8)), dtype=torch.float32)
    items = torch.tensor(rng.normal(size=(data.n_items, 8)), dtype=torch.float32)
    scores = (users @ items.T).numpy()
    for split in ("valid", "test"):
        got = Evaluator(data, KS, batch_users=7, head_share=0.3).evaluate(users, items, split)
        want = reference_tail_recall(scores, data, split, 0.3)
        assert want["tail_recall@20"] > 0
        for name in want:
            assert got[name] == pytest.approx(want[name], abs=1e-5), name
    assert not any(name.startswith("tail_") for name in Evaluator(data, KS).evaluate(users, items, "test"))


def test_perfect_and_worst_rankings():
    data = random_data(3)
    test = data.test.toarray()
    # Scores that put exactly the test items first (items seen are masked anyway).
    users = torch.eye(data.n_users)
    items = torch.tensor(test.T, dtype=torch.float32)
    metrics = Evaluator(data, [40]).evaluate(users, items, "test")
    assert metrics["recall@40"] == pytest.approx(1.0)
    assert metrics["ndcg@40"] == pytest.approx(1.0)
    metrics = Evaluator(data, [1]).evaluate(users, -items, "test")
    assert metrics["hit@1"] == 0.0
