"""Top-K ranking metrics exactly as the field's protocol (MMRec's) defines them.

Input: a hit matrix (users x K, 1 where the item ranked at that position is relevant) and the
number of relevant items per user. Users without relevant items must be left out by the caller.
"""

from __future__ import annotations

import torch

METRICS = ("recall", "ndcg", "precision", "map", "hit")
TAIL_RECALL = "tail_recall"  # recall of the long-tail relevant items (the evaluator's ``head_share``)
# Items new to the model (no training interaction), ranked among the new items alone: the cold-start metrics.
COLD_METRICS = ("cold_recall", "cold_ndcg")
# The share of the top-K slots of the full ranking that go to new items, over all of the split's users:
# whether a model puts its new items among the others at all (reported with the cold metrics).
NEW_SHARE = "new_share"


def metric_names(ks: list[int] | tuple[int, ...], tail: bool = False, cold: bool = False) -> list[str]:
    """Every metric key the evaluator reports for the cut-offs ``ks`` (``eval.topk``), in report
    order, with ``tail`` the long-tail recall and ``cold`` the new-item metrics last: the one list
    that reports, tables and artifacts use."""
    return ([f"{m}@{k}" for k in ks for m in METRICS] + ([f"{TAIL_RECALL}@{k}" for k in ks] if tail else [])
            + ([f"{m}@{k}" for k in ks for m in (*COLD_METRICS, NEW_SHARE)] if cold else []))


def reports_tail(metrics: dict[str, float]) -> bool:
    """Whether an evaluation's metrics hold the long-tail recall (runs made before it do not)."""
    return any(name.startswith(TAIL_RECALL) for name in metrics)


def reports_cold(metrics: dict[str, float]) -> bool:
    """Whether an evaluation's metrics hold the new-item metrics (only splits with new items do)."""
    return any(name.startswith(COLD_METRICS) for name in metrics)


def topk_metrics(hits: torch.Tensor, n_relevant: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user metric values, keyed like ``recall@20``; ``hits`` is users x max(ks), 0/1."""
    hits = hits.float()
    n_rel = n_relevant.float().unsqueeze(1)
    kmax = hits.shape[1]
    positions = torch.arange(1, kmax + 1, dtype=torch.float32, device=hits.device)
    discounts = 1.0 / torch.log2(positions + 1.0)
    cum_hits = hits.cumsum(dim=1)
    dcg = (hits * discounts).cumsum(dim=1)
    ideal = discounts.cumsum(dim=0)  # ideal[j]: IDCG with j + 1 relevant items in the top
    precision_at = cum_hits / positions
    sum_precision = (precision_at * hits).cumsum(dim=1)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        if k > kmax:
            raise ValueError(f"K={k} is larger than the ranked list ({kmax})")
        h = cum_hits[:, k - 1]
        cap = torch.clamp(n_rel.squeeze(1), max=k)  # min(|relevant|, K)
        out[f"recall@{k}"] = h / n_rel.squeeze(1)
        out[f"ndcg@{k}"] = dcg[:, k - 1] / ideal[(cap - 1).long()]
        out[f"precision@{k}"] = h / k
        out[f"map@{k}"] = sum_precision[:, k - 1] / cap
        out[f"hit@{k}"] = (h > 0).float()
    return out
