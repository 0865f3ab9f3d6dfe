"""FREEDOM (Zhou & Shen, "A Tale of Two Graphs: Freezing and Denoising Graph Structures for
Multimodal Recommendation", MM'23) on the shared harness.

    item ID embeddings smoothed over the frozen item-item graph S (one layer): h = S E_item
    LightGCN over a degree-sensitively pruned interaction graph (resampled every epoch)
    score = e_u · (e_i + h_i)
    loss = BPR + w · Σ_m BPR(e_u, projection of modality m's features), for any set of modalities

Unlike the reference code, only the batch's rows of the raw features are projected each step
(the reference projects the whole 7,050 x 4,096 table every batch for the same loss).
"""

from __future__ import annotations

import torch
from torch import nn

from diffcl.graphs import (
    DegreeSensitivePruner,
    normalized_adjacency,
    propagate,
    propagate_rows,
    to_torch_csr,
)
from diffcl.models import register
from diffcl.models.base import (
    Batch,
    ModelContext,
    Recommender,
    l2_reg,
    stacked_embeddings,
)


@register
class Freedom(Recommender):
    name = "freedom"
    uses_features = True

    def __init__(self, ctx: ModelContext, config):
        super().__init__(ctx, config)
        s = self.settings = config.freedom
        d = config.embedding_dim
        self.modalities = ctx.modalities(s.modalities)
        self.device = ctx.device
        self.full_adjacency = ctx.adjacency
        self.ego = stacked_embeddings(ctx.n_users, ctx.n_items, d)
        ctx.clear_new_item_rows(self.ego.data[ctx.n_users:])
        self.register_features(ctx, self.modalities)
        self.projections = nn.ModuleDict({m: nn.Linear(ctx.features[m].shape[1], d) for m in self.modalities})
        self.item_graph = ctx.item_graph(self.modalities)
        self.pruned = self.full_adjacency
        self.pruner = DegreeSensitivePruner(ctx.data.train, ctx.seed)

    def describe(self) -> str:
        mods = "+".join(self.modalities) or "no modality features: ID only"
        return f"freedom ({mods}, item graph {'on' if self.item_graph is not None else 'off'}, edge dropout {self.settings.dropout})"

    def start_epoch(self, epoch: int) -> None:
        """Resample the pruned interaction graph (FREEDOM's degree-sensitive edge pruning)."""
        if self.settings.dropout <= 0:
            self.pruned = self.full_adjacency
            return
        kept = self.pruner.sample(self.settings.dropout, epoch)
        self.pruned = to_torch_csr(normalized_adjacency(kept), self.device)

    def item_graph_embeddings(self) -> torch.Tensor | None:
        if self.item_graph is None:
            return None
        h = self.ego[self.n_users :]
        for _ in range(self.settings.item_layers):
            h = self.item_graph @ h
        return h

    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        n = len(batch.users)
        index = torch.cat([batch.users, batch.positives + self.n_users, batch.negatives + self.n_users])
        rows = propagate_rows(self.pruned, self.ego, index, self.settings.layers, "mean")
        users, pos, neg = rows.split(n)
        h = self.item_graph_embeddings()
        if h is not None:
            pos, neg = pos + h[batch.positives], neg + h[batch.negatives]
        name, rank = self.ranking_loss(batch, users, pos, neg)
        parts = {name: rank}
        total = rank
        for m in self.modalities:
            feats = self.features(m)
            # u·(W f_p + b) - u·(W f_n + b) = u·W (f_p - f_n): one projection of the difference,
            # half the work of projecting both (the bias cancels).
            projected = torch.nn.functional.linear(feats[batch.positives] - feats[batch.negatives], self.projections[m].weight)
            l_m = -torch.nn.functional.logsigmoid((users * projected).sum(dim=1)).mean()
            parts[f"bpr_{m}"] = l_m
            total = total + self.settings.feature_bpr_weight * l_m
        ego_items = self.ego[self.n_users :]
        reg = self.config.reg_weight * l2_reg(self.ego[batch.users], ego_items[batch.positives], ego_items[batch.negatives])
        return {"loss": total + reg, **parts, "reg": reg}

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = propagate(self.full_adjacency, self.ego, self.settings.layers, "mean")
        users, items = out[: self.n_users], out[self.n_users :]
        h = self.item_graph_embeddings()
        return users, items if h is None else items + h
