"""Contrastive and alignment losses shared by the multimodal models."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with cosine similarity and in-batch negatives: row i of ``anchors`` against all rows
    of ``positives``, row i the positive."""
    return info_nce_against(anchors, positives, torch.arange(anchors.shape[0], device=anchors.device), temperature)


def info_nce_against(anchors: torch.Tensor, candidates: torch.Tensor, positive_index: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """InfoNCE with cosine similarity against a candidate table: row i of ``anchors`` against every
    row of ``candidates``, the positive being row ``positive_index[i]`` (e.g. all nodes as negatives)."""
    a = F.normalize(anchors, dim=1)
    b = F.normalize(candidates, dim=1)
    return F.cross_entropy(a @ b.T / temperature, positive_index)


def weighted_info_nce(anchors: torch.Tensor, positives: torch.Tensor, temperature: float,
                      weights: torch.Tensor) -> torch.Tensor:
    """:func:`info_nce` with row i's term weighted by ``weights[i]`` (mean over the rows)."""
    a = F.normalize(anchors, dim=1)
    b = F.normalize(positives, dim=1)
    target = torch.arange(a.shape[0], device=a.device)
    return (weights * F.cross_entropy(a @ b.T / temperature, target, reduction="none")).mean()


def distribution_alignment(named: dict[str, torch.Tensor]) -> torch.Tensor:
    """MENTOR-style: Σ over pairs of |μ_a - μ_b| + |σ²_a - σ²_b| (scalar mean and variance of the rows)."""
    stats = {name: (x.mean(), x.var()) for name, x in named.items()}
    total = torch.zeros((), device=next(iter(named.values())).device)
    for a, b in itertools.combinations(stats, 2):
        total = total + (stats[a][0] - stats[b][0]).abs() + (stats[a][1] - stats[b][1]).abs()
    return total


def relational_alignment(guide: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(P_guide ‖ P_student) averaged over rows, where P_x(i, ·) is the softmax over the other rows
    j ≠ i of cos(x_i, x_j)/τ: the student's rows are pulled to the guide's neighbourhood structure,
    not onto the guide's rows themselves. The guide is detached (it is the stable side)."""
    n = guide.shape[0]
    if n < 3:
        return torch.zeros((), device=guide.device)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=guide.device)

    def log_neighbours(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=1)
        logits = (x @ x.T / temperature)[off_diagonal].view(n, n - 1)
        return F.log_softmax(logits, dim=1)

    target = log_neighbours(guide.detach())
    return F.kl_div(log_neighbours(student), target, log_target=True, reduction="batchmean")
