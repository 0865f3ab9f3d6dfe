"""DiffCL (Song et al., arXiv 2501.01066), as specified and measured in docs/model.md.

In the order a training step runs them (the defaults; each alternative is a model.diffcl switch):

1. projections   x̃ᵐ = MLPₘ(fᵐ) for each modality m (``modality_input: id_gated``: the branch's items
                 are e^id ⊙ σ(x̃ᵐ), MGCN's purifier); the ID branch has learned tables instead
2. encoder       Xᵐ = [Pᵐ; x̃ᵐ] (L2-row-normalised for the modality branches), Zᵐ = mean_{l≤L} Âˡ Xᵐ
                 (Â: the training graph; with diffusion.score_graph generated, the modality's
                 generated graph)
3. item graph    items get S·Z added (S: frozen fused kNN graph of the modality features;
                 ``item_graph_weighting: by_degree``: each item 2m/(d+m) of it by its training degree);
                 with ``user_graph_k`` users get U·Z added (U: frozen user co-occurrence graph)
4. fusion        e_i = [g_m Z_iᵐ + Z_iⁱᵈ]_m,  e_u = [w_uᵐ Z_uᵐ + Z_uⁱᵈ]_m (w: ``modality_gate``, g:
                 ``item_gate``; the ID term when ``id_in_score``, or as its own block: ``id_score``)
5. diffusion     DiffMM's generator: per modality, a denoiser over users' interaction rows proposes
                 new edges; the training graph plus them is the modality branch's contrastive view
                 (it is scored over the training graph; ``score_graph: generated``: over them, as
                 DiffMM does);
                 or two views of the batch rows of e (or per modality) by forward noising and
                 reverse denoising (optionally conditioned on the ID rows)
6. contrastive   InfoNCE: each modality branch over its generated graph against itself over the
                 training graph (``id_view``: the ID branch too; or modality against modality, or
                 against the ID rows)
7. alignment     the ID view aligns the modality views (distribution level, InfoNCE to ID, or per item by its degree)
8. objective     BPR + λ_cl L_cl + λ_align L_align + λ_diff L_diff + λ_reg L_reg

Each branch's stack, normalisation and propagation is one autograd function (graphs.py); the dense
MLPs run in bfloat16 where the hardware has it natively (``precision``).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn

from diffcl.core.device import dense_autocast, dense_dtype
from diffcl.graphs import (
    DegreeSensitivePruner,
    FrozenGraph,
    branch_propagate,
    branch_propagate_items,
    normalized_adjacency,
    to_torch_csr,
    torch_adjacency_blocks,
    user_cooccurrence_graph,
)
from diffcl.models import register
from diffcl.models.base import Batch, ModelContext, Recommender, l2_reg
from diffcl.models.contrastive import (
    distribution_alignment,
    info_nce,
    info_nce_against,
    relational_alignment,
    weighted_info_nce,
)
from diffcl.models.diffusion import Diffusion

log = logging.getLogger(__name__)

USERS, ITEMS = "users", "items"


def projection(kind: str, d_in: int, d: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d)
    return nn.Sequential(nn.Linear(d_in, 4 * d), nn.LeakyReLU(), nn.Linear(4 * d, d))


@dataclass
class BranchOutput:
    """One branch after propagation and the item graph."""

    users: torch.Tensor | None  # users x d; None where nothing reads the branch's user rows
    items: torch.Tensor  # items x d
    # The same branch over its other graph, where the generated_vs_training views read both (which
    # graph is scored and which is the view: DiffCL._branch_graphs).
    view: BranchOutput | None = None

    def side(self, side: str) -> torch.Tensor:
        rows = self.users if side == USERS else self.items
        assert rows is not None, f"this branch's {side} rows were not computed"
        return rows


class PassGraphs(NamedTuple):
    """What a pass propagates over: the interaction adjacency, each modality's generated adjacency
    (with id_view also "id": the interactions plus every generated edge), and the interaction
    adjacency's two blocks (only where the ID branch propagates item rows alone)."""

    interactions: torch.Tensor
    generated: dict[str, torch.Tensor]
    blocks: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class Fused:
    """The scored representations of a step: ``users`` holds the rows the step needs (all users,
    or the batch's and then the contrastive sample's), ``items`` every item."""

    users: torch.Tensor
    items: torch.Tensor
    sample_rows: torch.Tensor  # rows of ``users`` holding the contrastive sample's users


@dataclass
class ViewRows:
    """Rows that enter the views: ``table[index]``, for nodes ``nodes`` (user or item IDs) of ``side``."""

    target: str  # the diffusion that generates the views: "fused" or a branch name
    side: str  # USERS or ITEMS
    table: torch.Tensor
    index: torch.Tensor
    nodes: torch.Tensor

    @property
    def rows(self) -> torch.Tensor:
        return self.table[self.index]


@dataclass(frozen=True)
class BranchPlan:
    """Which branches exist and who reads the ID branch, resolved once from the settings. Where a
    setting cannot hold (no modality), the override is logged."""

    modalities: list[str]
    use_id: bool  # the ID branch exists: id_branch, or forced when there is no modality
    id_in_score: bool  # the ID rows are scored: id_in_score, or forced when there is no modality
    id_users_scored: bool  # the score reads the ID branch's user rows (id_in_score, or the attention gate's query)
    id_users_in_training: bool  # training reads them: scored, the ID-anchored / all-pairs views, the denoiser's condition, user alignment

    @classmethod
    def resolve(cls, settings, modalities: list[str]) -> BranchPlan:
        s, ds = settings, settings.diffusion
        if not modalities and not s.id_branch:
            log.warning("diffcl: no modality features and id_branch false: the ID branch is kept (it is the whole model)")
        use_id = s.id_branch or not modalities
        if not modalities and not s.id_in_score:
            log.warning("diffcl: no modality features: the ID branch is scored although id_in_score is false")
        id_in_score = use_id and (s.id_in_score or not modalities)
        attention = bool(modalities) and s.modality_gate == "id_attention"
        id_users_scored = use_id and (id_in_score or attention)
        # all_pairs: the ID branch is one of the pairs contrasted, users included.
        reads_id_users = s.contrastive and (ds.views in ("id_anchor", "all_pairs") or ds.condition == "id")
        reads_id_users = reads_id_users or (s.alignment and s.alignment_users)
        id_users_in_training = id_users_scored or (use_id and reads_id_users)
        if s.contrastive and ds.target == "interactions" and ds.views == "cross_modal" and len(modalities) < 2:
            log.info("diffcl: cross-modal views with %d modality: no pair, so no contrastive term", len(modalities))
        return cls(modalities, use_id, id_in_score, id_users_scored, id_users_in_training)

    @property
    def id_items_only(self) -> bool:
        """Nothing reads the ID branch's user rows: it propagates item rows only."""
        return self.use_id and not self.id_users_in_training

    @property
    def branches(self) -> list[str]:
        return [*self.modalities, *(["id"] if self.use_id else [])]


@register
class DiffCL(Recommender):
    name = "diffcl"
    uses_features = True

    def __init__(self, ctx: ModelContext, config):
        super().__init__(ctx, config)
        s = self.settings = config.diffcl
        d = self.d = config.embedding_dim
        self.plan = BranchPlan.resolve(s, ctx.modalities(s.modalities))
        self.modalities, self.branches = self.plan.modalities, self.plan.branches
        self.use_id, self.id_in_score = self.plan.use_id, self.plan.id_in_score
        self.id_items_only = self.plan.id_items_only
        self.adjacency = ctx.adjacency
        self.adjacency_blocks = ctx.adjacency_blocks if self.id_items_only else None
        self.dense_dtype = dense_dtype(s.precision, ctx.device)
        self.aligns = s.alignment and s.align_weight > 0

        self.register_features(ctx, self.modalities, s.max_feature_dim)
        self.projections = nn.ModuleDict({
            m: projection(s.projection, self.features(m).shape[1], d) for m in self.modalities
        })
        self.user_tables = nn.ParameterDict({
            b: nn.Parameter(nn.init.xavier_uniform_(torch.empty(ctx.n_users, d))) for b in self.branches
        })
        if self.use_id:
            self.item_id = nn.Parameter(nn.init.xavier_uniform_(torch.empty(ctx.n_items, d)))
            ctx.clear_new_item_rows(self.item_id.data)
        # The items whose ID row comes from content are those new when the model was trained: model
        # state, so that rescoring on later data (where some of them have interactions) keeps them.
        new = ctx.new_items if ctx.new_items is not None and s.new_item_id != "zero" and self.modalities else []
        self.register_buffer("content_id_items", torch.as_tensor(np.asarray(new, dtype=np.int64), device=ctx.device))
        self.register_load_state_dict_pre_hook(_load_content_id_items)
        self.user_weight_logits = nn.Parameter(torch.zeros(ctx.n_users, max(len(self.modalities), 1)))
        self.item_graph = ctx.item_graph(self.modalities) if s.item_graph else None
        # by_degree: each item's share of its content neighbours, 2m/(d+m) of its training degree d (the
        # median item keeps 1), derived from the data like the adjacency, so not model state.
        self.item_graph_share = 1.0
        if s.item_graph_weighting == "by_degree":
            degree = torch.as_tensor(ctx.data.item_degrees, dtype=torch.float32)
            median = degree.median().clamp_min(1.0)
            self.item_graph_share = (2 * median / (degree + median)).unsqueeze(1).to(ctx.device)
        self.user_graph = None
        if s.user_graph_k:
            self.user_graph = FrozenGraph(user_cooccurrence_graph(ctx.data.train, s.user_graph_k), ctx.device)

        ds = s.diffusion
        self.start_step = ds.steps if ds.start_step is None else ds.start_step
        self.diffusions = nn.ModuleDict()
        if ds.target != "interactions":
            width = d * max(len(self.modalities), 1) if s.fusion == "concat" else d
            if self.id_in_score and s.id_score == "own_block" and self.modalities:
                width += d
            targets = ["fused"] if ds.target == "fused" else self.modalities or ["id"]
            cond_dim = d if ds.condition == "id" else 0
            self.diffusions.update({
                t: Diffusion(width if t == "fused" else d, ds.steps, ds.noise_scale, ds.noise_min, ds.noise_max,
                             ds.hidden, ds.time_dim, self.dense_dtype, cond_dim)
                for t in targets
            })
        # Parameters of the newer switches come last, so the old defaults draw the same initial values.
        n_mod = max(len(self.modalities), 1)
        self.gate_logits = nn.Parameter(torch.zeros(n_mod)) if s.modality_gate == "global_softmax" else None
        self.item_gate_logits = nn.Parameter(torch.zeros(n_mod)) if s.item_gate else None
        if s.modality_gate == "id_attention" and self.modalities:
            self.attention_query = nn.Linear(d, d, bias=False)
            self.attention_key = nn.Linear(d, d, bias=False)
        # DiffMM's generator: one interaction denoiser per modality, and the graphs it generated.
        self.interaction_diffusions = nn.ModuleDict()
        if ds.target == "interactions":
            self.train_rows = sp.csr_matrix(ctx.data.train, dtype=np.float32)
            self.interaction_diffusions.update({
                m: Diffusion(ctx.n_items, ds.steps, ds.noise_scale, ds.noise_min, ds.noise_max, ds.graph_hidden,
                             ds.time_dim, self.dense_dtype)
                for m in self.modalities
            })
        # The generated edges are model state (buffers: -1 until the first generation), so that a
        # checkpoint scores with the graphs it was trained on; the adjacency is derived from them.
        for m in self.interaction_diffusions:
            self.register_buffer(f"generated_{m}", torch.full((ctx.n_users, ds.graph_k), -1, dtype=torch.long))
        self.generated_adjacency: dict[str, torch.Tensor] = {}
        # FREEDOM's edge pruning (edge_dropout): the graphs a training step propagates over, resampled
        # every epoch; evaluation keeps the full ones above.
        self.pruner = DegreeSensitivePruner(ctx.data.train, ctx.seed) if s.edge_dropout > 0 else None
        self.kept_edges: sp.csr_matrix | None = None
        self.pruned: PassGraphs | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module._build_generated_adjacency())
        # degree_guided alignment: how far each item's ID row is trusted as the guide, d / (d + median d)
        # of its training degree d (derived from the data, like the adjacency, so not model state).
        self.item_stability = None
        if s.alignment_mode == "degree_guided":
            degree = torch.as_tensor(ctx.data.item_degrees, dtype=torch.float32)
            self.item_stability = (degree / (degree + degree.median().clamp_min(1.0))).to(ctx.device)

    def describe(self) -> str:
        s = self.settings
        parts = [f"branches {'+'.join(self.branches)}"]
        if s.modality_input == "id_gated" and self.modalities:
            parts.append("modality items: ID rows gated by the features")
        if not self.modalities:
            parts.append("NO modality features: ID branch alone")
        item_graph = "off" if self.item_graph is None else "on" if s.item_graph_weighting == "uniform" else "by degree"
        parts.append(f"item graph {item_graph}")
        ds = s.diffusion
        if self.user_graph is not None:
            parts.append(f"user graph k={s.user_graph_k}")
        if not ds.enabled:
            parts.append("Gaussian views (no diffusion)")
        else:
            scored_over_generated = ds.views == "generated_vs_training" and not ds.scores_over_training_graph
            switches = {f"edges by {ds.graph_source}": ds.graph_source != "denoiser",
                        "scored over the generated graphs": scored_over_generated, "ID view": ds.id_view}
            parts.append(", ".join([f"diffusion {ds.target}/{ds.views}", *(text for text, on in switches.items() if on)]))
        parts.append("contrastive on" if s.contrastive else "contrastive off")
        parts.append(f"gate {s.modality_gate}{' + item gate' if s.item_gate else ''}, ID {s.id_score}")
        parts.append(f"dense MLPs in {'bf16' if self.dense_dtype is not None else 'fp32'}")
        parts.append(f"alignment {s.alignment_mode}{' + users' if s.alignment_users else ''}" if s.alignment else "alignment off")
        return f"diffcl ({', '.join(parts)})"

    # ------------------------------------------------------------------ encoder (sections 1-4)
    def project(self, modality: str, items: torch.Tensor | None = None) -> torch.Tensor:
        """The modality's projected features x̃ of all items (or of ``items``)."""
        # The projections of all items are the largest dense products of a step: mixed precision
        # where the hardware has it (``precision``), float32 out.
        features = self.features(modality) if items is None else self.features(modality)[items]
        with dense_autocast(self.dense_dtype, features.device):
            return self.projections[modality](features).float()

    def modality_items(self, modality: str) -> torch.Tensor:
        """A modality branch's item input: the projected features, or (``modality_input: id_gated``)
        the ID rows gated by them, so the features select what of the interactions' item
        representation the branch keeps (MGCN's purifier)."""
        projected = self.project(modality)
        if self.settings.modality_input == "id_gated":
            return self.id_items() * torch.sigmoid(projected)
        return projected

    def id_items(self) -> torch.Tensor:
        """The ID branch's item input: the ID table, with (``new_item_id: from_content``) each new item's
        row the mean of its modalities' projected features, the only thing known of it
        (``from_content_scaled``: that direction at the trained rows' mean length)."""
        new = self.content_id_items
        if len(new) == 0:
            return self.item_id
        from_content = torch.stack([self.project(m, new) for m in self.modalities]).mean(dim=0)
        if self.settings.new_item_id == "from_content_scaled":
            # Measured on Scientific: projections about 0.1 long against trained ID rows of about 1.4,
            # so unscaled content rows barely differ from zero rows in the scores.
            norms = self.item_id.detach().norm(dim=1)  # the trained rows' mean: all rows less the new ones
            length = self.settings.new_item_length * (norms.sum() - norms[new].sum()) / (len(norms) - len(new))
            from_content = nn.functional.normalize(from_content, dim=1) * length
        return self.item_id.index_put((new,), from_content)

    def branches_in_use(self, training: bool) -> list[str]:
        """The branches a forward pass needs: an ID branch that is not scored is read only by the
        alignment loss, the ID-anchored or all-pairs views or the denoiser's condition, so evaluation (and
        training without them) skips it."""
        reads_id = (self.plan.id_users_in_training or self.aligns) if training else self.plan.id_users_scored
        return self.branches if reads_id else self.modalities

    def encode(self, branches: list[str], training: bool = False) -> dict[str, BranchOutput]:
        """Per branch: its user and item rows after propagation and the item graph (in training with
        the generated_vs_training views, its rows over its other graph too: see :meth:`_branch_graphs`)."""
        out = {}
        s = self.settings
        layers, combine = s.layers, s.combine
        both_graphs = training and s.contrastive and s.cl_weight > 0 and s.diffusion.views == "generated_vs_training"
        graphs = self.graphs(training)
        for b in branches:
            normalize, view = self.normalizes(b), None
            # Each branch propagates on its own: three 64-column products beat one 192-column one.
            if b == "id" and self.id_items_only:
                users = None
                items = branch_propagate_items(graphs.blocks, self.user_tables[b], self.id_items(), layers, combine, normalize)
            else:
                ego_items = self.id_items() if b == "id" else self.modality_items(b)
                scored, other = self._branch_graphs(b, graphs)
                users, items = branch_propagate(scored, self.user_tables[b], ego_items, layers, combine, normalize)
                if both_graphs and other is not None:
                    view_users, view_items = branch_propagate(other, self.user_tables[b], ego_items, layers, combine, normalize)
                    view = BranchOutput(self._add_user_graph(view_users), self._add_item_graph(view_items))
            out[b] = BranchOutput(self._add_user_graph(users), self._add_item_graph(items), view)
        return out

    def _branch_graphs(self, branch: str, graphs: PassGraphs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the graph a branch is scored over, the graph of its other view or None): a modality branch
        is scored over the training graph and viewed over its generated graph (``score_graph:
        generated`` swaps the two); the ID branch is scored over the training graph and (id_view)
        viewed over the union of the generated graphs."""
        if branch == "id":
            return graphs.interactions, graphs.generated.get("id")
        if branch in graphs.generated:
            generated = graphs.generated[branch]
            if self.settings.diffusion.scores_over_training_graph:
                return graphs.interactions, generated
            return generated, graphs.interactions
        return graphs.interactions, None

    def graphs(self, training: bool) -> PassGraphs:
        """The graphs a pass propagates over: in training with edge_dropout, the epoch's pruned ones."""
        if training and self.pruned is not None:
            return self.pruned
        return PassGraphs(self.adjacency, self.generated_adjacency, self.adjacency_blocks)

    def _add_item_graph(self, items: torch.Tensor) -> torch.Tensor:
        return items if self.item_graph is None else items + self.item_graph_share * (self.item_graph @ items)

    def _add_user_graph(self, users: torch.Tensor | None) -> torch.Tensor | None:
        return users if self.user_graph is None or users is None else users + self.user_graph @ users

    def normalizes(self, branch: str) -> bool:
        mode = self.settings.normalize_inputs
        return mode == "all" or (mode == "modalities" and branch != "id")

    def user_weights(self, z: dict[str, BranchOutput], users: torch.Tensor | slice) -> torch.Tensor:
        """(n, M): the user-side weight of each modality block (``modality_gate``), with modality
        dropout in training."""
        gate = self.settings.modality_gate
        if gate == "user_softmax":
            weights = torch.softmax(self.user_weight_logits[users], dim=1)
        elif gate == "user_sigmoid":
            weights = 2 * torch.sigmoid(self.user_weight_logits[users])
        elif gate == "global_softmax":
            n = self.user_weight_logits[users].shape[0]
            weights = torch.softmax(self.gate_logits, dim=0).expand(n, -1)
        else:  # id_attention: the user's ID row asks which of the user's modality rows to read
            query = self.attention_query(z["id"].users[users])
            keys = torch.stack([self.attention_key(z[m].users[users]) for m in self.modalities], dim=1)
            weights = torch.softmax((keys @ query.unsqueeze(2)).squeeze(2) / self.d**0.5, dim=1)
        p = self.settings.modality_dropout
        if self.training and p > 0:
            weights = weights * torch.bernoulli(torch.full_like(weights, 1 - p)) / (1 - p)
        return weights

    def fuse(self, z: dict[str, BranchOutput], users: torch.Tensor | slice = slice(None)) -> tuple[torch.Tensor, torch.Tensor]:
        """(e_u for ``users``, e_i for all items): the scored representations."""
        if not self.modalities:
            return z["id"].users[users], z["id"].items
        weights = self.user_weights(z, users)
        user_parts = [weights[:, k : k + 1] * z[m].users[users] for k, m in enumerate(self.modalities)]
        item_parts = [z[m].items for m in self.modalities]
        if self.item_gate_logits is not None:
            gates = 2 * torch.sigmoid(self.item_gate_logits)
            item_parts = [gates[k] * part for k, part in enumerate(item_parts)]
        if self.settings.fusion == "sum":
            e_u, e_i = sum(user_parts), sum(item_parts)
            repeat = 1
        else:
            e_u, e_i = torch.cat(user_parts, dim=1), torch.cat(item_parts, dim=1)
            repeat = len(self.modalities)
        if self.id_in_score:
            id_users, id_items = z["id"].users[users], z["id"].items
            if self.settings.id_score == "own_block":
                e_u, e_i = torch.cat([id_users, e_u], dim=1), torch.cat([id_items, e_i], dim=1)
            else:
                e_u, e_i = e_u + id_users.repeat(1, repeat), e_i + id_items.repeat(1, repeat)
        return e_u, e_i

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fuse(self.encode(self.branches_in_use(training=False)))

    # ------------------------------------------------------------------ generated graphs (DiffMM)
    def start_epoch(self, epoch: int) -> None:
        ds = self.settings.diffusion
        if self.pruner is not None:  # first, so that a generation below builds its pruned graphs from these edges
            self.kept_edges = self.pruner.sample(self.settings.edge_dropout, epoch)
            device = self.user_weight_logits.device
            normalized = normalized_adjacency(self.kept_edges)
            blocks = torch_adjacency_blocks(normalized, self.n_users, device) if self.id_items_only else None
            self.pruned = PassGraphs(to_torch_csr(normalized, device), {}, blocks)
        if ds.target == "interactions" and ds.enabled and epoch > 1 and (epoch - 1) % ds.graph_every == 0:
            self.generate_graphs()
        elif self.pruned is not None:
            self.pruned = self.pruned._replace(generated=self._generated_adjacency(self.kept_edges))

    def _dense_rows(self, users: np.ndarray, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.train_rows[users].toarray()).to(device)

    @torch.no_grad()
    def generate_graphs(self, chunk: int = 2048) -> None:
        """Each modality's denoiser scores every item for every user from the user's training row;
        the top ``graph_k`` per user (among the items unseen by that user, with ``graph_new_only``) become that
        modality's generated edges, and the modality branch propagates over the normalised result."""
        ds = self.settings.diffusion
        device = self.user_weight_logits.device
        n_users = self.train_rows.shape[0]
        # The self-training control scores with each modality branch as it stands (its current graph).
        z = self.encode(self.modalities) if ds.graph_source == "model" else None
        for m, diffusion in self.interaction_diffusions.items():
            cols = []
            for start in range(0, n_users, chunk):
                users = np.arange(start, min(start + chunk, n_users))
                x0 = self._dense_rows(users, device)
                if ds.graph_source == "random":  # the control: as many edges, to items drawn uniformly
                    scores = torch.rand(x0.shape, device=device)
                elif z is not None:
                    scores = z[m].users[start : start + len(users)] @ z[m].items.T
                else:
                    scores = diffusion.generate(x0, ds.graph_sample_steps, add_noise=False)
                if ds.graph_new_only:
                    scores = scores.masked_fill(x0 > 0, float("-inf"))
                if ds.graph_temperature > 0 and ds.graph_source != "random":
                    scores = gumbel_perturbed(scores, ds.graph_temperature)
                cols.append(scores.topk(ds.graph_k, dim=1).indices.cpu().numpy())
            getattr(self, f"generated_{m}").copy_(torch.from_numpy(np.concatenate(cols)))
        self._build_generated_adjacency()

    def _build_generated_adjacency(self) -> None:
        """The generated graphs over all training edges and, with edge_dropout, over the kept ones."""
        self.generated_adjacency = self._generated_adjacency(self.train_rows) if self.interaction_diffusions else {}
        if self.pruned is not None:
            self.pruned = self.pruned._replace(generated=self._generated_adjacency(self.kept_edges))

    def _generated_adjacency(self, interactions: sp.csr_matrix) -> dict[str, torch.Tensor]:
        """Each modality's normalised adjacency from its generated edges and ``interactions`` (none
        before the first generation); with id_view also "id", ``interactions`` plus every modality's
        generated edges (whatever graph_mode: the ID branch's view adds edges, it never replaces them)."""
        ds = self.settings.diffusion
        n_users, n_items, device = self.n_users, self.n_items, self.user_weight_logits.device
        out, all_generated = {}, None
        for m in self.interaction_diffusions:
            edges = getattr(self, f"generated_{m}")
            if bool((edges < 0).any()):
                continue
            cols = edges.cpu().numpy().ravel()
            rows = np.repeat(np.arange(n_users), edges.shape[1])
            generated = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n_users, n_items))
            out[m] = _binary_adjacency(generated if ds.graph_mode == "replace" else interactions + generated, device)
            all_generated = generated if all_generated is None else all_generated + generated
        if ds.id_view and all_generated is not None and self.use_id:
            out["id"] = _binary_adjacency(interactions + all_generated, device)
        return out

    def interaction_diffusion_loss(self, z: dict[str, BranchOutput], users: torch.Tensor) -> torch.Tensor:
        """The interaction denoisers' loss on (at most ``graph_users`` of) the batch's users' rows,
        with DiffMM's modality-aware term: the denoised row read through modality m's item rows
        should match the true row read through the ID item rows."""
        ds = self.settings.diffusion
        users = users[: ds.graph_users]
        x0 = self._dense_rows(users.cpu().numpy(), users.device)
        total = torch.zeros((), device=users.device)
        for m, diffusion in self.interaction_diffusions.items():
            truth = z["id"].items if "id" in z else z[m].items
            total = total + diffusion.row_losses(x0, embed=(z[m].items, truth), embed_weight=ds.graph_embed_weight).mean()
        return total / max(1, len(self.interaction_diffusions))

    # ------------------------------------------------------------------ views (sections 5-6)
    def _condition(self, z: dict[str, BranchOutput], side: str, nodes: torch.Tensor | None = None) -> torch.Tensor | None:
        """The denoiser's condition for these nodes (all of the side's nodes when None): their ID rows."""
        if self.settings.diffusion.condition != "id":
            return None
        rows = z["id"].side(side)
        return rows if nodes is None else rows[nodes]

    def _view(self, target: str, x0: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        diffusion = self.diffusions[target]
        if self.settings.diffusion.enabled:
            return diffusion.generate(x0, self.start_step, cond)
        return diffusion.perturb(x0, self.start_step)

    def _two_views(self, target: str, x0: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.settings.diffusion.views == "clean_vs_diffused":
            return x0, self._view(target, x0, cond)
        # Both views in one chain over stacked rows: the noise is drawn per row, so they are independent.
        both = self._view(target, torch.cat([x0, x0]), None if cond is None else torch.cat([cond, cond]))
        return both[: len(x0)], both[len(x0) :]

    def _contrast(self, anchors: torch.Tensor, positives: torch.Tensor, candidates: torch.Tensor | None,
                  positive_index: torch.Tensor) -> torch.Tensor:
        """InfoNCE of ``anchors`` against ``positives`` (in-batch negatives), or, with all-node
        negatives, against ``candidates`` with the positive at ``positive_index``."""
        tau = self.settings.temperature
        if candidates is None:
            return info_nce(anchors, positives, tau)
        return info_nce_against(anchors, candidates, positive_index, tau)

    def view_rows(self, z: dict[str, BranchOutput], fused: Fused, users: torch.Tensor, items: torch.Tensor) -> list[ViewRows]:
        if self.settings.diffusion.target == "fused":
            return [ViewRows("fused", USERS, fused.users, fused.sample_rows, users),
                    ViewRows("fused", ITEMS, fused.items, items, items)]
        return [ViewRows(b, side, z[b].side(side), nodes, nodes)
                for b in self.diffusions for side, nodes in ((USERS, users), (ITEMS, items))]

    def contrastive_and_diffusion(self, z: dict[str, BranchOutput], fused: Fused, users: torch.Tensor,
                                  items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_cl, L_diff) over the contrastive sample's ``users`` and ``items`` (node IDs)."""
        s = self.settings
        views = s.diffusion.views
        all_nodes = s.negatives == "all_nodes"
        zero = torch.zeros((), device=fused.items.device)
        if s.diffusion.target == "interactions":
            # The diffusion happened in graph space: the branches' own rows are the views.
            return self._branch_contrast(z, users, items), zero
        entries = self.view_rows(z, fused, users, items)
        # Each target's rows gathered and stacked once: its views and its denoiser loss share them.
        stacked = _stack_by_target(entries, lambda e: self._condition(z, e.side, e.nodes))
        l_cl = zero
        if views == "cross_modal":
            # Every pair of modalities, users and items: one generated view of each against the other.
            pairs_of_modalities = list(itertools.combinations(self.modalities, 2))
            for first, second in pairs_of_modalities:
                for side, nodes in ((USERS, users), (ITEMS, items)):
                    a = self._view(first, z[first].side(side)[nodes], self._condition(z, side, nodes))
                    b = self._view(second, z[second].side(side)[nodes], self._condition(z, side, nodes))
                    candidates = self._view(second, z[second].side(side), self._condition(z, side)) if all_nodes else None
                    l_cl = l_cl + self._contrast(a, b, candidates, nodes)
            l_cl = l_cl / len(pairs_of_modalities)
        elif views == "id_anchor":
            # One generated view of each modality's rows, contrasted with the clean ID rows of the same
            # nodes: the stable ID representation anchors what each modality's view must keep.
            for target, group in stacked.items():
                for entry, view in zip(group.entries, self._view(target, group.rows, group.cond).split(group.sizes), strict=True):
                    candidates = self._view(target, entry.table, self._condition(z, entry.side)) if all_nodes else None
                    l_cl = l_cl + self._contrast(z["id"].side(entry.side)[entry.nodes], view, candidates, entry.index)
            l_cl = l_cl / len(stacked)
        else:
            pairs = []  # every target's views first, then the contrasts
            for target, group in stacked.items():
                v1, v2 = self._two_views(target, group.rows, group.cond)
                pairs += zip(group.entries, v1.split(group.sizes), v2.split(group.sizes), strict=True)
            for entry, a, b in pairs:
                candidates = self._view(entry.target, entry.table, self._condition(z, entry.side)) if all_nodes else None
                l_cl = l_cl + self._contrast(a, b, candidates, entry.index)
            l_cl = l_cl / max(1, len(entries) // 2)
        l_diff = zero
        if s.diffusion.enabled and s.diff_weight > 0:
            for target, group in stacked.items():
                losses = self.diffusions[target].row_losses(group.rows, group.cond)
                l_diff = l_diff + sum(part.mean() for part in losses.split(group.sizes))
            l_diff = l_diff / max(1, len(entries) // 2)
        return l_cl, l_diff

    def _branch_contrast(self, z: dict[str, BranchOutput], users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """With generated graphs: each modality branch's rows against its own rows over its other
        graph (generated_vs_training; with id_view the ID branch's too), against the ID rows
        (id_anchor), against each other modality's (cross_modal), or every pair of branches, the ID
        branch included (all_pairs); users and items."""
        s = self.settings
        if s.diffusion.views == "generated_vs_training":
            # Each branch over a graph with generated edges against itself without them: the
            # generated edges are the augmentation (none before the first generation; the ID branch
            # only with id_view).
            pairs = [(out, out.view) for out in z.values() if out.view is not None]
        elif s.diffusion.views == "id_anchor":
            pairs = [(z["id"], z[m]) for m in self.modalities]
        else:
            names = self.branches if s.diffusion.views == "all_pairs" else self.modalities
            pairs = [(z[a], z[b]) for a, b in itertools.combinations(names, 2)]
        total = torch.zeros((), device=users.device)
        for first, second in pairs:
            for side, nodes in ((USERS, users), (ITEMS, items)):
                total = total + info_nce(first.side(side)[nodes], second.side(side)[nodes], s.temperature)
        return total / max(1, len(pairs))

    # ------------------------------------------------------------------ alignment (section 7)
    def alignment(self, z: dict[str, BranchOutput], fused: Fused, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """L_align over the contrastive sample's items; with ``alignment_users`` plus the same over its
        users (each modality's user rows guided by the ID user rows; the fused rows stay item-side)."""
        total = self._aligned(ITEMS, z, fused.items[items], items)
        if self.settings.alignment_users:
            total = total + self._aligned(USERS, z, None, users)
        return total

    def _aligned(self, side: str, z: dict[str, BranchOutput], fused_rows: torch.Tensor | None,
                 nodes: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), device=nodes.device)
        views = {m: z[m].side(side)[nodes] for m in self.modalities}
        mode = self.settings.alignment_mode
        if mode == "id_relational":
            if not self.use_id or not views:
                return zero
            guide = z["id"].side(side)[nodes]
            return sum(relational_alignment(guide, v, self.settings.temperature) for v in views.values()) / len(views)
        if mode == "id_guided_projection":
            if not self.use_id or not views:
                return zero
            # The projection of an item's features (before any propagation) is pulled towards its
            # detached ID rows: the features learn to say what the interactions say about the item.
            guide = z["id"].items[nodes].detach()
            return sum(info_nce(self.project(m, nodes), guide, self.settings.temperature) for m in views) / len(views)
        if mode == "degree_guided":
            if not self.use_id or not views:
                return zero
            # Where an item has many interactions its ID row guides the modality rows; where it has
            # few, its modality rows guide the ID row (each side detached where it is the guide).
            id_rows = z["id"].items[nodes]
            trust = self.item_stability[nodes]
            return sum(weighted_info_nce(v, id_rows.detach(), self.settings.temperature, trust)
                       + weighted_info_nce(id_rows, v.detach(), self.settings.temperature, 1 - trust)
                       for v in views.values()) / len(views)
        if mode in ("id_anchor_infonce", "stable_id_infonce"):
            if not self.use_id:
                return zero
            anchor = z["id"].side(side)[nodes]
            if mode == "stable_id_infonce":
                anchor = anchor.detach()  # the ID rows guide the modality rows and are not pulled towards them
            return sum(info_nce(anchor, v, self.settings.temperature) for v in views.values())
        named = {**({"id": z["id"].side(side)[nodes]} if self.use_id else {}),
                 **({"fused": fused_rows} if fused_rows is not None else {}), **views}
        return distribution_alignment(named) if len(named) > 1 else zero

    def _nodes(self, ids: torch.Tensor) -> torch.Tensor:
        """The batch's unique nodes, at most ``cl_nodes`` of them (a uniform random subset)."""
        unique = torch.unique(ids)
        cap = self.settings.cl_nodes
        if cap is None or len(unique) <= cap:
            return unique
        return unique[torch.randperm(len(unique), device=unique.device)[:cap]]

    # ------------------------------------------------------------------ objective (section 8)
    def loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        s = self.settings
        z = self.encode(self.branches_in_use(training=True), training=True)
        users, items = self._nodes(batch.users), self._nodes(batch.positives)
        n = len(batch.users)
        if s.contrastive and s.negatives == "all_nodes":
            e_u, e_i = self.fuse(z)
            fused, e_batch = Fused(e_u, e_i, users), e_u[batch.users]
        else:
            # Fuse only the user rows this step uses (the batch's, then the contrastive sample's).
            e_u, e_i = self.fuse(z, torch.cat([batch.users, users]))
            fused, e_batch = Fused(e_u, e_i, torch.arange(n, n + len(users), device=e_u.device)), e_u[:n]
        name, rank = self.ranking_loss(batch, e_batch, e_i[batch.positives], e_i[batch.negatives])
        reg_rows = [self.user_tables[b][batch.users] for b in z]
        if "id" in z:
            reg_rows += [self.item_id[batch.positives], self.item_id[batch.negatives]]
        reg = self.config.reg_weight * l2_reg(*reg_rows, self.user_weight_logits[batch.users])
        parts = {name: rank, "reg": reg}
        total = rank + reg
        if s.contrastive and s.cl_weight > 0:
            l_cl, l_diff = self.contrastive_and_diffusion(z, fused, users, items)
            parts["cl"], parts["diff"] = l_cl, l_diff
            total = total + s.cl_weight * l_cl + s.diff_weight * l_diff
        if self.interaction_diffusions and s.diffusion.enabled and s.diffusion.graph_source == "denoiser" and s.diff_weight > 0:
            # The generator trains whether or not the contrastive loss is on.
            parts["diff"] = self.interaction_diffusion_loss(z, users)
            total = total + s.diff_weight * parts["diff"]
        if self.aligns:
            l_align = self.alignment(z, fused, users, items)
            parts["align"] = l_align
            total = total + s.align_weight * l_align
        return {"loss": total, **parts}


def gumbel_perturbed(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Each row standardised over its finite entries, divided by ``temperature``, plus Gumbel noise:
    the top-k of the result is a draw of k items without replacement from the softmax of the row
    (Gumbel top-k), whatever the scale of the scores; -inf entries stay excluded."""
    finite = torch.isfinite(scores)
    count = finite.sum(1, keepdim=True).clamp_min(1)
    values = scores.masked_fill(~finite, 0.0)
    mean = values.sum(1, keepdim=True) / count
    std = (((values - mean) * finite) ** 2).sum(1, keepdim=True).div(count).sqrt().clamp_min(1e-8)
    gumbel = -torch.log(-torch.log(torch.rand_like(values).clamp(1e-20, 1.0)))
    return ((scores - mean) / std / temperature + gumbel).masked_fill(~finite, float("-inf"))


def _binary_adjacency(graph: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """The normalised adjacency of ``graph``'s edges, each counted once (a sum of edge sets may hold 2s)."""
    graph.data[:] = 1.0
    return to_torch_csr(normalized_adjacency(graph), device)


@dataclass
class _TargetRows:
    entries: list[ViewRows]
    rows: torch.Tensor  # the entries' rows stacked (users then items)
    cond: torch.Tensor | None  # their conditions, stacked the same way
    sizes: list[int]


def _stack_by_target(entries: list[ViewRows],
                     condition: Callable[[ViewRows], torch.Tensor | None]) -> dict[str, _TargetRows]:
    """Per diffusion target: which entries use it, their rows (and conditions) stacked and the row
    counts, so that each denoiser runs once per step over all of its rows."""
    groups: dict[str, list[ViewRows]] = {}
    for entry in entries:
        groups.setdefault(entry.target, []).append(entry)
    out = {}
    for target, members in groups.items():
        rows = [e.rows for e in members]
        conds = [condition(e) for e in members]
        cond = None if conds[0] is None else torch.cat(conds)
        out[target] = _TargetRows(members, torch.cat(rows), cond, [len(r) for r in rows])
    return out


def _load_content_id_items(module: DiffCL, state: dict[str, torch.Tensor], prefix: str, *_args) -> None:
    """A checkpoint's own set of new items replaces the one built from the current data (its length
    may differ); checkpoints written before the set was saved get the one built, as they then did."""
    key = f"{prefix}content_id_items"
    if key in state:
        module.content_id_items = state[key].to(module.content_id_items.device, torch.long).clone()
    else:
        state[key] = module.content_id_items.clone()  # the caller's dict must not share the live buffer
