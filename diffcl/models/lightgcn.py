"""LightGCN (He et al., SIGIR 2020): ID embeddings smoothed over the normalised user-item graph.

    E⁰ = [users; items],  Eˡ⁺¹ = Â Eˡ,  E = mean (or sum) of E⁰ .. Eᴸ,  score = e_u · e_i
"""

from __future__ import annotations

import torch

from diffcl.graphs import propagate, propagate_rows
from diffcl.models import register
from diffcl.models.base import (
    Batch,
    ModelContext,
    Recommender,
    l2_reg,
    stacked_embeddings,
)


@register
class LightGCN(Recommender):
    name = "lightgcn"

    def __init__(self, ctx: ModelContext, config):
        super().__init__(ctx, config)
        self.adjacency = ctx.adjacency
        self.settings = config.lightgcn
        self.ego = stacked_embeddings(ctx.n_users, ctx.n_items, config.embedding_dim)
        ctx.clear_new_item_rows(self.ego.data[ctx.n_users:])

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = propagate(self.adjacency, self.ego, self.settings.layers, self.settings.combine)
        return out[: self.n_users], out[self.n_users :]

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        # Only the batch's rows of the propagated table are needed: gather them in one pass.
        index = torch.cat([batch.users, batch.positives + self.n_users, batch.negatives + self.n_users])
        rows = propagate_rows(self.adjacency, self.ego, index, self.settings.layers, self.settings.combine)
        users, positives, negatives = rows.split(len(batch.users))
        name, rank = self.ranking_loss(batch, users, positives, negatives)
        ego = self.ego[index]
        reg = self.config.reg_weight * l2_reg(*ego.split(len(batch.users)))
        return {"loss": rank + reg, name: rank, "reg": reg}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self()

    def describe(self) -> str:
        return f"lightgcn ({self.settings.layers} layers, {self.settings.combine})"
