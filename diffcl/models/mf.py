"""MF-BPR: a user and an item embedding table, scored by their dot product (Rendle et al., 2009)."""

from __future__ import annotations

import torch
from torch import nn

from diffcl.models import register
from diffcl.models.base import Batch, ModelContext, Recommender, l2_reg


@register
class MF(Recommender):
    name = "mf"

    def __init__(self, ctx: ModelContext, config):
        super().__init__(ctx, config)
        self.user_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(ctx.n_users, config.embedding_dim)))
        self.item_emb = nn.Parameter(nn.init.xavier_uniform_(torch.empty(ctx.n_items, config.embedding_dim)))
        ctx.clear_new_item_rows(self.item_emb.data)

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        u = self.user_emb[batch.users]
        p = self.item_emb[batch.positives]
        n = self.item_emb[batch.negatives]
        name, rank = self.ranking_loss(batch, u, p, n)
        reg = self.config.reg_weight * l2_reg(u, p, n)
        return {"loss": rank + reg, name: rank, "reg": reg}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_emb, self.item_emb
