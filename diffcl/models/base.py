"""The one interface every model follows, so that the sampler, trainer and evaluator never
special-case a model.

A model gets a :class:`ModelContext` (the data, the shared graphs, the features) and its config.
It answers two questions: the training loss of a BPR batch, and the user and item embeddings whose
dot product ranks items at evaluation time.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from diffcl.core.config import DEFAULT_MODALITY_WEIGHTS, ModelConfig
from diffcl.data import InteractionData
from diffcl.graphs import (
    FrozenGraph,
    fuse_item_graphs,
    normalized_adjacency,
    to_torch_csr,
    torch_adjacency_blocks,
)


class Batch(NamedTuple):
    users: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor


@dataclass
class ModelContext:
    """What a model may read: the interactions, the graphs built from the training split, the
    frozen item-item graph and the modality features (where they exist), and the device."""

    data: InteractionData
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    features: dict[str, np.ndarray] = field(default_factory=dict)  # modality -> items x d_m
    knn_graphs: dict[str, sp.csr_matrix] = field(default_factory=dict)  # modality -> frozen kNN graph
    # graphs.modality_weights: w_m of the fused item-item graph, before renormalisation
    modality_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MODALITY_WEIGHTS))
    seed: int = 0  # train.seed: seeds a model's own per-epoch draws (the pruned edges), apart from torch's stream
    # Items new to the model (the cold-start protocol, train.negatives trained_items): no training
    # interaction and never drawn as negatives, so their ID rows start, and without any content path
    # stay, at zero: nothing is known of a new item but its content.
    new_items: np.ndarray | None = None

    def clear_new_item_rows(self, item_rows: torch.Tensor) -> None:
        """Zero the rows of ``new_items`` in an items x d ID table (in place, after its initialisation,
        so that the other rows draw the same values as without the protocol)."""
        if self.new_items is not None and len(self.new_items):
            with torch.no_grad():
                item_rows[torch.as_tensor(self.new_items, device=item_rows.device)] = 0.0

    def modalities(self, wanted: list[str]) -> list[str]:
        """The wanted modalities that have features, in the order of ``wanted`` (repeats dropped)."""
        return [m for m in dict.fromkeys(wanted) if m in self.features]

    def item_graph(self, modalities: list[str]) -> FrozenGraph | None:
        """S = Σ_m w_m S_m over the given modalities' kNN graphs (one alone when only one); see
        :func:`diffcl.graphs.fusion_weights`."""
        graphs = {m: self.knn_graphs[m] for m in modalities if m in self.knn_graphs}
        fused = fuse_item_graphs(graphs, self.modality_weights)
        return None if fused is None else FrozenGraph(fused, self.device)

    @property
    def n_users(self) -> int:
        return self.data.n_users

    @property
    def n_items(self) -> int:
        return self.data.n_items

    @functools.cached_property
    def _normalized(self) -> sp.csr_matrix:
        return normalized_adjacency(self.data.train)

    @functools.cached_property
    def adjacency(self) -> torch.Tensor:
        """The normalised bipartite adjacency (N x N, CSR on the device), built once."""
        return to_torch_csr(self._normalized, self.device)

    @functools.cached_property
    def adjacency_blocks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(R̂, R̂ᵀ): the user-item and item-user blocks of the normalised adjacency, built once."""
        return torch_adjacency_blocks(self._normalized, self.n_users, self.device)


class Recommender(nn.Module, ABC):
    name: ClassVar[str]
    uses_features: ClassVar[bool] = False  # read modality features and item-item graphs

    def __init__(self, ctx: ModelContext, config: ModelConfig):
        super().__init__()
        self.n_users, self.n_items = ctx.n_users, ctx.n_items
        self.config = config
        # rebuilt from the training split, so not in checkpoints
        corrected = config.ranking_loss == "in_batch_softmax" and config.softmax_logq
        log_q = candidate_log_probability(ctx.data.item_degrees, ctx.new_items) if corrected else None
        self.register_buffer("candidate_log_q", log_q, persistent=False)

    @abstractmethod
    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Loss parts for one batch; the key ``loss`` holds the total that is minimised."""

    @abstractmethod
    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users x d, items x d): scores are their dot products. Called under no_grad."""

    def describe(self) -> str:
        """One line for the log: what this model runs on."""
        return self.name

    def register_features(self, ctx: ModelContext, modalities: list[str], max_dim: int | None = None) -> None:
        """Frozen buffers of the modality features (see :func:`reduce_features`); not in checkpoints,
        since they are rebuilt from the feature files."""
        for m in modalities:
            self.register_buffer(f"features_{m}", reduce_features(ctx.features[m], max_dim), persistent=False)

    def features(self, modality: str) -> torch.Tensor:
        return getattr(self, f"features_{modality}")

    def start_epoch(self, epoch: int) -> None:
        """Called before each training epoch (FREEDOM resamples its pruned graph here)."""

    def ranking_loss(self, batch: Batch, users: torch.Tensor, positives: torch.Tensor,
                     negatives: torch.Tensor) -> tuple[str, torch.Tensor]:
        """The recommendation loss every model minimises, named for the loss parts by ``model.ranking_loss``:
        ``bpr`` (one sampled negative a pair) or ``in_batch_softmax``."""
        if self.config.ranking_loss == "bpr":
            return "bpr", bpr_loss(users, positives, negatives)
        return self.config.ranking_loss, in_batch_softmax_loss(batch, users, positives, negatives,
                                                               self.config.softmax_temperature, self.candidate_log_q)


def reduce_features(matrix: np.ndarray, max_dim: int | None) -> torch.Tensor:
    """Raw features as a float tensor; wider than ``max_dim`` they are centred and projected on
    their top ``max_dim`` principal components (computed once, frozen)."""
    x = torch.tensor(np.asarray(matrix, dtype=np.float32))
    if max_dim is None or x.shape[1] <= max_dim:
        return x
    mean = x.mean(dim=0, keepdim=True)
    _, _, v = torch.pca_lowrank(x - mean, q=max_dim, center=False, niter=3)
    return (x - mean) @ v


def stacked_embeddings(n_users: int, n_items: int, dim: int) -> nn.Parameter:
    """One table of users then items, each half Xavier-initialised on its own. Propagation needs
    them stacked, and slicing a stacked parameter is free where concatenating two would copy every step."""
    table = nn.Parameter(torch.empty(n_users + n_items, dim))
    nn.init.xavier_uniform_(table[:n_users])
    nn.init.xavier_uniform_(table[n_users:])
    return table


def bpr_loss(users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """-log σ(u·p - u·n), averaged over the batch."""
    pos = (users * positives).sum(dim=1)
    neg = (users * negatives).sum(dim=1)
    return -nn.functional.logsigmoid(pos - neg).mean()


def in_batch_softmax_loss(batch: Batch, users: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor,
                          temperature: float, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Sampled softmax: each user's positive against every positive and sampled negative of the
    batch (2B candidates), cross-entropy of u·i / τ - log q_i (``log_q``: each item's log chance of
    being a candidate, when corrected). A candidate that is the user's own positive item elsewhere in
    the batch, or another positive of the same user, is masked out: it is no negative."""
    n = len(batch.users)
    logits = users @ torch.cat([positives, negatives]).T / temperature
    candidate_items = torch.cat([batch.positives, batch.negatives])
    if log_q is not None:
        logits = logits - log_q[candidate_items]
    false_negative = candidate_items.unsqueeze(0) == batch.positives.unsqueeze(1)
    false_negative[:, :n] |= batch.users.unsqueeze(0) == batch.users.unsqueeze(1)
    target = torch.arange(n, device=logits.device)
    false_negative[target, target] = False
    return nn.functional.cross_entropy(logits.masked_fill(false_negative, float("-inf")), target)


def candidate_log_probability(item_degrees: np.ndarray, never_negatives: np.ndarray | None = None) -> torch.Tensor:
    """log q_i of an in-batch candidate: half the batch are positives, drawn by training interaction
    (so in proportion to item i's degree), half sampled negatives, drawn uniformly among all items but
    ``never_negatives`` (the context's new items under train.negatives trained_items)."""
    drawable = np.ones(len(item_degrees), dtype=bool)
    if never_negatives is not None:
        drawable[never_negatives] = False
    q = 0.5 * item_degrees / item_degrees.sum() + 0.5 * drawable / drawable.sum()
    # An item that is never a candidate (q = 0) is never looked up; log 1 = 0 keeps the buffer finite.
    return torch.tensor(np.log(np.where(q > 0, q, 1.0)), dtype=torch.float32)


def l2_reg(*tensors: torch.Tensor) -> torch.Tensor:
    """½ Σ ||x||² over the given rows, divided by the batch size (LightGCN's regulariser)."""
    return sum(t.pow(2).sum() for t in tensors) / (2 * tensors[0].shape[0])
