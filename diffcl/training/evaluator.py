"""Full-ranking evaluation: every item scored for every user, in user batches.

Training items are masked (and validation items when testing), the top max(K) items are taken
with ``torch.topk``, and the metrics of :mod:`diffcl.core.metrics` are averaged over the users that have
relevant items in the split. The per-batch index tensors are built once and reused every epoch.

With ``head_share`` > 0 the evaluation also reports ``tail_recall@K``: of each user's relevant items
outside the ``head_share`` most-interacted items of the training split (the long tail, where item
content has to stand in for scarce interactions), the share in the full top-K list, averaged over
the users with at least one such item.

Where a split has relevant items without a training interaction (new to the model: TikTok's
published split has some, ``prepare.held_out_items`` makes them on purpose), it also reports
``cold_recall@K`` and ``cold_ndcg@K``: the new items alone ranked for each user with such an item
(the cold-start protocol's candidate set), averaged over those users, and ``new_share@K``: the
share of the full top-K list that is new items, averaged over all of the split's users (a model
that never ranks a new item among the trained ones has 0, whatever its cold metrics).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from diffcl.core.metrics import COLD_METRICS, NEW_SHARE, TAIL_RECALL, metric_names, topk_metrics
from diffcl.data import InteractionData


@dataclass
class _Batch:
    users: torch.Tensor
    mask_rows: torch.Tensor
    mask_cols: torch.Tensor
    rel_rows: torch.Tensor
    rel_cols: torch.Tensor
    n_relevant: torch.Tensor
    rel_is_tail: torch.Tensor  # per relevant entry: the item is in the long tail
    n_tail_relevant: torch.Tensor
    n_new_relevant: torch.Tensor  # per user: relevant items without a training interaction


def _rows_cols(matrix: sp.csr_matrix, users: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    sub = matrix[users]
    rows = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
    return torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(sub.indices.astype(np.int64))


class Evaluator:
    def __init__(self, data: InteractionData, ks: list[int], batch_users: int = 4096, device: torch.device | str = "cpu",
                 head_share: float = 0.0):
        if not 0.0 <= head_share < 1.0:
            raise ValueError(f"head_share must be in [0, 1), got {head_share}")
        self.data = data
        self.ks = sorted(ks)
        self.n_items = data.n_items
        self.device = torch.device(device)
        self.head_share = head_share
        self.is_tail = tail_items(data.item_degrees, head_share)
        self.new_items = torch.from_numpy(data.new_items).to(self.device)
        is_new = torch.zeros(self.n_items, dtype=torch.bool)
        is_new[torch.from_numpy(data.new_items)] = True
        self.is_new = is_new.to(self.device)
        self._batches = {
            "valid": self._prepare(data.valid, data.train, batch_users, is_new),
            "test": self._prepare(data.test, (data.train + data.valid).tocsr(), batch_users, is_new),
        }

    def _prepare(self, relevant: sp.csr_matrix, seen: sp.csr_matrix, batch_users: int,
                 is_new: torch.Tensor) -> list[_Batch]:
        n_rel = np.diff(relevant.indptr)
        users = np.flatnonzero(n_rel > 0)
        batches = []
        for start in range(0, len(users), batch_users):
            chunk = users[start : start + batch_users]
            mask_rows, mask_cols = _rows_cols(seen, chunk)
            rel_rows, rel_cols = _rows_cols(relevant, chunk)
            rel_is_tail = torch.from_numpy(self.is_tail)[rel_cols]
            n_tail = torch.zeros(len(chunk), dtype=torch.int64).index_add_(0, rel_rows, rel_is_tail.long())
            n_new = torch.zeros(len(chunk), dtype=torch.int64).index_add_(0, rel_rows, is_new[rel_cols].long())
            batches.append(_Batch(
                *(t.to(self.device) for t in (
                    torch.from_numpy(chunk.astype(np.int64)), mask_rows, mask_cols, rel_rows, rel_cols,
                    torch.from_numpy(n_rel[chunk].astype(np.int64)), rel_is_tail, n_tail, n_new,
                ))
            ))
        return batches

    def n_users(self, split: str) -> int:
        return sum(len(b.users) for b in self._batches[split])

    def reported_metrics(self, split: str) -> set[str]:
        """The metric keys :meth:`evaluate` returns on ``split``, known before any model is scored
        (so that a selection metric the data cannot report fails before training, not after)."""
        if not self._batches[split]:
            return set()  # no user to evaluate: evaluate() returns no metric
        names = set(metric_names(self._ks_within(self.n_items), tail=self.head_share > 0))
        cold_ks = self._ks_within(len(self.new_items))
        if cold_ks and any(bool((b.n_new_relevant > 0).any()) for b in self._batches[split]):
            names |= {f"{m}@{k}" for k in cold_ks for m in COLD_METRICS}
            names |= {f"{NEW_SHARE}@{k}" for k in self._ks_within(self.n_items)}
        return names

    def _ks_within(self, n_candidates: int) -> list[int]:
        return [k for k in self.ks if k <= n_candidates]

    @torch.no_grad()
    def evaluate(self, user_emb: torch.Tensor, item_emb: torch.Tensor, split: str = "valid") -> dict[str, float]:
        """Mean metrics over the split's users, from embeddings whose dot product is the score."""
        kmax = min(max(self.ks), self.n_items)
        item_t = item_emb.to(self.device).T.contiguous()
        user_emb = user_emb.to(self.device)
        ks = self._ks_within(kmax)
        sums: dict[str, torch.Tensor] = {}
        tail_sums: dict[str, torch.Tensor] = {}
        cold_sums: dict[str, torch.Tensor] = {}
        share_sums: dict[str, torch.Tensor] = {}
        count = tail_count = cold_count = 0
        cold_ks = self._ks_within(len(self.new_items))
        for b in self._batches[split]:
            scores = user_emb[b.users] @ item_t
            scores[b.mask_rows, b.mask_cols] = -torch.inf
            top = torch.topk(scores, kmax, dim=1).indices
            relevant = torch.zeros_like(scores, dtype=torch.bool)
            relevant[b.rel_rows, b.rel_cols] = True
            hits = torch.gather(relevant, 1, top)
            for name, values in topk_metrics(hits, b.n_relevant, ks).items():
                sums[name] = sums.get(name, 0.0) + values.sum()
            count += len(b.users)
            has_new = b.n_new_relevant > 0
            if cold_ks and bool(has_new.any()):
                # The new items alone, ranked (seen ones stay at -inf): only their columns are copied.
                cold_scores = scores.index_select(1, self.new_items)[has_new]
                cold_top = torch.topk(cold_scores, max(cold_ks), dim=1).indices
                cold_hits = torch.gather(relevant.index_select(1, self.new_items)[has_new], 1, cold_top)
                for name, values in topk_metrics(cold_hits, b.n_new_relevant[has_new], cold_ks).items():
                    if f"cold_{name.split('@')[0]}" in COLD_METRICS:
                        cold_sums[f"cold_{name}"] = cold_sums.get(f"cold_{name}", 0.0) + values.sum()
                cold_count += int(has_new.sum())
            if cold_ks:
                new_in_top = self.is_new[top].float()
                for k in ks:
                    share_sums[f"{NEW_SHARE}@{k}"] = share_sums.get(f"{NEW_SHARE}@{k}", 0.0) + new_in_top[:, :k].mean(1).sum()
            if self.head_share > 0:
                relevant.zero_()
                relevant[b.rel_rows[b.rel_is_tail], b.rel_cols[b.rel_is_tail]] = True
                tail_hits = torch.gather(relevant, 1, top).cumsum(dim=1)
                has_tail = b.n_tail_relevant > 0
                for k in ks:
                    recall = tail_hits[has_tail, k - 1] / b.n_tail_relevant[has_tail]
                    name = f"{TAIL_RECALL}@{k}"
                    tail_sums[name] = tail_sums.get(name, 0.0) + recall.sum()
                tail_count += int(has_tail.sum())
        out = {name: float(total) / max(count, 1) for name, total in sums.items()}
        out |= {name: float(total) / max(cold_count, 1) for name, total in cold_sums.items()}
        if cold_count:  # reported with the cold metrics, over every user of the split
            out |= {name: float(total) / count for name, total in share_sums.items()}
        return out | {name: float(total) / max(tail_count, 1) for name, total in tail_sums.items()}

    @torch.no_grad()
    def top_items(self, user_emb: torch.Tensor, item_emb: torch.Tensor, users: torch.Tensor,
                  seen: sp.csr_matrix, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k unseen items (and their scores) for some users: what ``diffcl recommend`` shows."""
        scores = user_emb[users] @ item_emb.T
        rows, cols = _rows_cols(seen, users.numpy())
        scores[rows, cols] = -torch.inf
        result = torch.topk(scores, min(k, self.n_items), dim=1)
        return result.indices, result.values


def tail_items(degree: np.ndarray, head_share: float) -> np.ndarray:
    """Per item: outside the ceil(head_share x items) items with the most training interactions
    (``degree``; ties broken by item ID, so the split is deterministic)."""
    n_head = int(np.ceil(head_share * len(degree)))
    is_tail = np.ones(len(degree), dtype=bool)
    is_tail[np.argsort(-degree, kind="stable")[:n_head]] = False
    return is_tail


@torch.no_grad()
def evaluate_model(model: torch.nn.Module, evaluator: Evaluator, split: str) -> dict[str, float]:
    """The one evaluation path (trainer, evaluate stage, CLI): the model's embeddings, ranked."""
    model.eval()
    users, items = model.embeddings()
    return evaluator.evaluate(users, items, split)
