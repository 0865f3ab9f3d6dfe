"""Contrastive and alignment losses shared by the multimodal models."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float,
             candidates: torch.Tensor | None = None, positive_index: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE with cosine similarity.

    In-batch (default): row i of ``anchors`` against all rows of ``positives``, row i the positive.
    All nodes: against every row of ``candidates``, the positive at ``positive_index``.
    """
    a = F.normalize(anchors, dim=1)
    if candidates is None:
        b = F.normalize(positives, dim=1)
        target = torch.arange(a.shape[0], device=a.device)
    else:
        b = F.normalize(candidates, dim=1)
        target = positive_index
    logits = a @ b.T / temperature
    return F.cross_entropy(logits, target)


def distribution_alignment(named: dict[str, torch.Tensor]) -> torch.Tensor:
    """MENTOR-style: Σ over pairs of |μ_a - μ_b| + |σ²_a - σ²_b| (scalar mean and variance of the rows)."""
    stats = {name: (x.mean(), x.var()) for name, x in named.items()}
    total = torch.zeros((), device=next(iter(named.values())).device)
    for a, b in itertools.combinations(stats, 2):
        total = total + (stats[a][0] - stats[b][0]).abs() + (stats[a][1] - stats[b][1]).abs()
    return total
