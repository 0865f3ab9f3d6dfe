"""Vectorised BPR sampling: every training pair once per epoch, one uniform negative each.

Negatives are drawn uniformly over all items (or over ``candidates``, for the cold-start protocol:
the items with a training interaction); draws that hit one of the user's training items are
redrawn, all colliding draws at once, until none collides (the documented rule: a negative is never
a training positive of its user; it may be a validation or test item, as in the field's toolkits).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import scipy.sparse as sp
import torch


class BPRSampler:
    def __init__(self, train: sp.csr_matrix, batch_size: int, seed: int, max_rounds: int = 100,
                 candidates: np.ndarray | None = None):
        coo = train.tocoo()
        self.users = coo.row.astype(np.int64)
        self.items = coo.col.astype(np.int64)
        self.n_items = train.shape[1]
        # Sorted keys user * I + item: membership by binary search, no Python loop per sample.
        self.keys = np.sort(self.users * self.n_items + self.items)
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        self.max_rounds = max_rounds
        # None: every item, drawn as integers below n_items (the draws of runs made before candidates existed).
        self.candidates = None if candidates is None else np.asarray(candidates, dtype=np.int64)
        n_candidates = self.n_items if self.candidates is None else len(self.candidates)
        dense_users = np.bincount(self.users, minlength=train.shape[0])
        if (dense_users >= n_candidates).any():
            raise ValueError("a user has interacted with every candidate item: no negative can be drawn")

    def __len__(self) -> int:
        return -(-len(self.users) // self.batch_size)

    def is_positive(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users * self.n_items + items
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        return self.keys[pos] == keys

    def _draw(self, n: int) -> np.ndarray:
        if self.candidates is None:
            return self.rng.integers(0, self.n_items, n)
        return self.candidates[self.rng.integers(0, len(self.candidates), n)]

    def negatives(self, users: np.ndarray) -> np.ndarray:
        neg = self._draw(len(users))
        for _ in range(self.max_rounds):
            clash = np.flatnonzero(self.is_positive(users, neg))
            if clash.size == 0:
                return neg
            neg[clash] = self._draw(clash.size)
        raise RuntimeError("negative sampling did not converge; is the training matrix nearly dense?")

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(users, positives, negatives) batches covering every training pair once, shuffled."""
        order = self.rng.permutation(len(self.users))
        users, pos = self.users[order], self.items[order]
        neg = self.negatives(users)
        users_t, pos_t, neg_t = (torch.from_numpy(a) for a in (users, pos, neg))
        for start in range(0, len(order), self.batch_size):
            stop = start + self.batch_size
            yield users_t[start:stop], pos_t[start:stop], neg_t[start:stop]


def negative_candidates(train: sp.csr_matrix, negatives: str) -> np.ndarray | None:
    """``train.negatives`` as the sampler's ``candidates``: None for every item, or the items with a
    training interaction (trained_items, the cold-start protocol)."""
    if negatives == "all_items":
        return None
    if negatives == "trained_items":
        return np.flatnonzero(np.asarray(train.getnnz(axis=0)) > 0)
    raise ValueError(f"train.negatives must be all_items or trained_items, got {negatives!r}")
