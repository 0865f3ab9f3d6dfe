"""DiffCL (Song et al., arXiv 2501.01066), as specified and measured in docs/model.md.

In the order a training step runs them (the defaults; each alternative is a model.diffcl switch):

1. projections   x̃ᵐ = MLPₘ(fᵐ) for each modality m; the ID branch has learned tables instead
2. encoder       Xᵐ = [Pᵐ; x̃ᵐ] (L2-row-normalised for the modality branches), Zᵐ = mean_{l≤L} Âˡ Xᵐ
3. item graph    items get S·Z added (S: frozen fused kNN graph of the modality features)
4. fusion        e_i = [Z_iᵐ + Z_iⁱᵈ]_m,  e_u = [w_uᵐ Z_uᵐ + Z_uⁱᵈ]_m (softmax per-user weights; the
                 ID term when ``id_in_score``)
5. diffusion     two views of the batch rows of e (or per modality), by forward noising and reverse
                 denoising
6. contrastive   InfoNCE between the views (or each modality's view against the ID rows)
7. alignment     the ID view aligns the modality views (distribution level, or InfoNCE to ID)
8. objective     BPR + λ_cl L_cl + λ_align L_align + λ_diff L_diff + λ_reg L_reg

Each branch's stack, normalisation and propagation is one autograd function (graphs.py); the dense
MLPs run in bfloat16 where the hardware has it natively (``precision``).
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch import nn

from diffcl.core.device import dense_autocast, dense_dtype
from diffcl.graphs import branch_propagate, branch_propagate_items
from diffcl.models import register
from diffcl.models.base import Batch, ModelContext, Recommender, bpr_loss, l2_reg
from diffcl.models.contrastive import distribution_alignment, info_nce
from diffcl.models.diffusion import Diffusion

log = logging.getLogger(__name__)


def projection(kind: str, d_in: int, d: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(d_in, d)
    return nn.Sequential(nn.Linear(d_in, 4 * d), nn.LeakyReLU(), nn.Linear(4 * d, d))


@register
class DiffCL(Recommender):
    name = "diffcl"
    uses_features = True

    def __init__(self, ctx: ModelContext, config):
        super().__init__(ctx, config)
        s = self.settings = config.diffcl
        d = self.d = config.embedding_dim
        self.modalities = ctx.modalities(s.modalities)
        self.use_id = s.id_branch or not self.modalities
        self.branches = [*self.modalities, *(["id"] if self.use_id else [])]
        self.id_in_score = self.use_id and (s.id_in_score or not self.modalities)  # w/o ID: nothing to add
        self.adjacency = ctx.adjacency
        # Unless it is scored or anchors the views, nothing reads the ID branch's user rows: it then
        # propagates item rows only.
        self.id_anchors_views = s.contrastive and s.diffusion.views == "id_anchor"
        self.id_items_only = self.use_id and not self.id_in_score and not self.id_anchors_views
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
        self.user_weight_logits = nn.Parameter(torch.zeros(ctx.n_users, max(len(self.modalities), 1)))
        self.item_graph = ctx.item_graph(self.modalities) if s.item_graph else None

        width = d * max(len(self.modalities), 1) if s.fusion == "concat" else d
        ds = s.diffusion
        self.start_step = ds.steps if ds.start_step is None else ds.start_step
        targets = ["fused"] if ds.target == "fused" else self.modalities or ["id"]
        self.diffusions = nn.ModuleDict({
            t: Diffusion(width if t == "fused" else d, ds.steps, ds.noise_scale, ds.noise_min, ds.noise_max,
                         ds.hidden, ds.time_dim, self.dense_dtype)
            for t in targets
        })

    def describe(self) -> str:
        s = self.settings
        parts = [f"branches {'+'.join(self.branches)}"]
        if not self.modalities:
            parts.append("NO modality features: ID branch alone")
        parts.append(f"item graph {'on' if self.item_graph is not None else 'off'}")
        parts.append(f"diffusion {s.diffusion.target}/{s.diffusion.views}" if s.diffusion.enabled else "Gaussian views (no diffusion)")
        parts.append("contrastive on" if s.contrastive else "contrastive off")
        parts.append(f"dense MLPs in {'bf16' if self.dense_dtype is not None else 'fp32'}")
        parts.append(f"alignment {s.alignment_mode}" if s.alignment else "alignment off")
        return f"diffcl ({', '.join(parts)})"

    # ------------------------------------------------------------------ encoder (sections 1-4)
    def project(self, modality: str) -> torch.Tensor:
        # The projections of all items are the largest dense products of a step: mixed precision
        # where the hardware has it (``precision``), float32 out.
        features = self.features(modality)
        with dense_autocast(self.dense_dtype, features.device):
            return self.projections[modality](features).float()

    def branches_in_use(self, training: bool) -> list[str]:
        """The branches a forward pass needs: an ID branch that is not scored is read only by the
        alignment loss or the ID-anchored views, so evaluation (and training without them) skips it."""
        if not self.use_id or self.id_in_score or (training and (self.aligns or self.id_anchors_views)):
            return self.branches
        return self.modalities

    def encode(self, branches: list[str]) -> dict[str, tuple[torch.Tensor | None, torch.Tensor]]:
        """Per branch: (users x d, items x d) after propagation and the item graph; the ID branch's
        users are None where nothing reads them."""
        out = {}
        layers, combine = self.settings.layers, self.settings.combine
        for b in branches:
            normalize = self.normalizes(b)
            # Each branch propagates on its own: three 64-column products beat one 192-column one.
            if b == "id" and self.id_items_only:
                z_users = None
                z_items = branch_propagate_items(self.adjacency_blocks, self.user_tables[b], self.item_id, layers, combine, normalize)
            else:
                items = self.item_id if b == "id" else self.project(b)
                z_users, z_items = branch_propagate(self.adjacency, self.user_tables[b], items, layers, combine, normalize)
            if self.item_graph is not None:
                z_items = z_items + self.item_graph @ z_items
            out[b] = (z_users, z_items)
        return out

    def normalizes(self, branch: str) -> bool:
        mode = self.settings.normalize_inputs
        return mode == "all" or (mode == "modalities" and branch != "id")

    def fuse(self, z: dict[str, tuple[torch.Tensor | None, torch.Tensor]], users: torch.Tensor | slice = slice(None)):
        """(e_u for ``users``, e_i for all items): the scored representations."""
        if not self.modalities:
            return z["id"][0][users], z["id"][1]
        weights = torch.softmax(self.user_weight_logits[users], dim=1)
        user_parts = [weights[:, k : k + 1] * z[m][0][users] for k, m in enumerate(self.modalities)]
        item_parts = [z[m][1] for m in self.modalities]
        if self.settings.fusion == "sum":
            e_u, e_i = sum(user_parts), sum(item_parts)
            repeat = 1
        else:
            e_u, e_i = torch.cat(user_parts, dim=1), torch.cat(item_parts, dim=1)
            repeat = len(self.modalities)
        if self.id_in_score:
            e_u = e_u + z["id"][0][users].repeat(1, repeat)
            e_i = e_i + z["id"][1].repeat(1, repeat)
        return e_u, e_i

    def embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fuse(self.encode(self.branches_in_use(training=False)))

    # ------------------------------------------------------------------ views (sections 5-6)
    def _view(self, target: str, x0: torch.Tensor) -> torch.Tensor:
        diffusion = self.diffusions[target]
        if self.settings.diffusion.enabled:
            return diffusion.generate(x0, self.start_step)
        return diffusion.perturb(x0, self.start_step)

    def _views(self, target: str, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.settings.diffusion.views == "clean_vs_diffused":
            return x0, self._view(target, x0)
        # Both views in one chain over stacked rows: the noise is drawn per row, so they are independent.
        both = self._view(target, torch.cat([x0, x0]))
        return both[: len(x0)], both[len(x0) :]

    def _contrast(self, a: torch.Tensor, b: torch.Tensor, all_b: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        tau = self.settings.temperature
        if all_b is None:
            return info_nce(a, b, tau)
        return info_nce(a, b, tau, candidates=all_b, positive_index=index)

    def contrastive_and_diffusion(self, z, e_u, e_i_all, users, items, fused_users) -> tuple[torch.Tensor, torch.Tensor]:
        """``users`` index the per-branch tables in ``z``; ``fused_users`` index ``e_u`` (all users
        with all-node negatives, else only the rows the batch needs)."""
        s = self.settings
        all_nodes = s.negatives == "all_nodes"
        zero = torch.zeros((), device=e_u.device)
        l_cl, l_diff = zero, zero
        if s.diffusion.target == "fused":
            pairs = [("fused", e_u, fused_users), ("fused", e_i_all, items)]
        else:
            pairs = [(m, z[m][side], idx) for m in self.diffusions for side, idx in ((0, users), (1, items))]
        # Each target's rows gathered and stacked once: its views and its denoiser loss share them.
        stacked = _stack_by_target(pairs)
        if s.diffusion.views == "cross_modal":
            # Every pair of modalities, users and items: one generated view of each against the other.
            pairs_of_modalities = list(itertools.combinations(self.modalities, 2))
            for first, second in pairs_of_modalities:
                for side, idx in ((0, users), (1, items)):
                    a = self._view(first, z[first][side][idx])
                    b = self._view(second, z[second][side][idx])
                    l_cl = l_cl + self._contrast(a, b, self._view(second, z[second][side]) if all_nodes else None, idx)
            l_cl = l_cl / len(pairs_of_modalities)
        elif s.diffusion.views == "id_anchor":
            # One generated view of each modality's rows, contrasted with the clean ID rows of the same
            # nodes: the stable ID representation anchors what each modality's view must keep.
            for m, (_, rows, sizes) in stacked.items():
                for side, idx, view in zip((0, 1), (users, items), self._view(m, rows).split(sizes), strict=True):
                    candidates = self._view(m, z[m][side]) if all_nodes else None
                    l_cl = l_cl + self._contrast(z["id"][side][idx], view, candidates, idx)
            l_cl = l_cl / len(stacked)
        else:
            views: list = [None] * len(pairs)
            for target, (members, rows, sizes) in stacked.items():
                v1, v2 = self._views(target, rows)
                for k, a, b in zip(members, v1.split(sizes), v2.split(sizes), strict=True):
                    views[k] = (a, b)
            for (target, table, idx), (v1, v2) in zip(pairs, views, strict=True):
                candidates = self._view(target, table) if all_nodes else None
                l_cl = l_cl + self._contrast(v1, v2, candidates, idx)
            l_cl = l_cl / max(1, len(pairs) // 2)
        if s.diffusion.enabled and s.diff_weight > 0:
            for target, (_, rows, sizes) in stacked.items():
                l_diff = l_diff + sum(part.mean() for part in self.diffusions[target].row_losses(rows).split(sizes))
            l_diff = l_diff / max(1, len(pairs) // 2)
        return l_cl, l_diff

    # ------------------------------------------------------------------ alignment (section 7)
    def alignment(self, z, e_i_all, items) -> torch.Tensor:
        views = {m: z[m][1][items] for m in self.modalities}
        if self.settings.alignment_mode == "id_anchor_infonce":
            if not self.use_id:
                return torch.zeros((), device=e_i_all.device)
            anchor = z["id"][1][items]
            return sum(info_nce(anchor, v, self.settings.temperature) for v in views.values())
        named = {**({"id": z["id"][1][items]} if self.use_id else {}), "fused": e_i_all[items], **views}
        return distribution_alignment(named) if len(named) > 1 else torch.zeros((), device=e_i_all.device)

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
        z = self.encode(self.branches_in_use(training=True))
        users, items = self._nodes(batch.users), self._nodes(batch.positives)
        n = len(batch.users)
        if s.contrastive and s.negatives == "all_nodes":
            e_u, e_i_all = self.fuse(z)
            e_batch, fused_users = e_u[batch.users], users
        else:
            # Fuse only the user rows this step uses (the batch's, then the contrastive sample's).
            e_u, e_i_all = self.fuse(z, torch.cat([batch.users, users]))
            e_batch, fused_users = e_u[:n], torch.arange(n, n + len(users), device=e_u.device)
        bpr = bpr_loss(e_batch, e_i_all[batch.positives], e_i_all[batch.negatives])
        reg_rows = [self.user_tables[b][batch.users] for b in z]
        if "id" in z:
            reg_rows += [self.item_id[batch.positives], self.item_id[batch.negatives]]
        reg = self.config.reg_weight * l2_reg(*reg_rows, self.user_weight_logits[batch.users])
        parts = {"bpr": bpr, "reg": reg}
        total = bpr + reg
        if s.contrastive and s.cl_weight > 0:
            l_cl, l_diff = self.contrastive_and_diffusion(z, e_u, e_i_all, users, items, fused_users)
            parts["cl"], parts["diff"] = l_cl, l_diff
            total = total + s.cl_weight * l_cl + s.diff_weight * l_diff
        if self.aligns:
            l_align = self.alignment(z, e_i_all, items)
            parts["align"] = l_align
            total = total + s.align_weight * l_align
        return {"loss": total, **parts}


def _stack_by_target(pairs) -> dict[str, tuple[list[int], torch.Tensor, list[int]]]:
    """Per diffusion target: which pairs use it, their rows stacked (users then items) and the
    row counts, so that each denoiser runs once per step over all of its rows."""
    groups: dict[str, list[int]] = {}
    for k, (target, _, _) in enumerate(pairs):
        groups.setdefault(target, []).append(k)
    out = {}
    for target, members in groups.items():
        rows = [pairs[k][1][pairs[k][2]] for k in members]
        out[target] = (members, torch.cat(rows), [len(r) for r in rows])
    return out
