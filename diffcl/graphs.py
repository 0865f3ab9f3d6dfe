"""The sparse graphs every graph model shares: the normalised user-item adjacency and the frozen
item-item kNN graphs built from modality features.

One implementation of each, used by LightGCN, FREEDOM and DiffCL alike.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import scipy.sparse as sp
import torch

from diffcl.ann import (
    exact_neighbours,
    faiss_knn_graph,
    neighbour_count,
    neighbour_graph,
    normalized_rows,
)


def normalized_adjacency(train: sp.csr_matrix) -> sp.csr_matrix:
    """Â = D^-1/2 [[0, R], [Rᵀ, 0]] D^-1/2 over N = U + I nodes, without self-loops.

    Nodes without training interactions get zero rows (not infinities).
    """
    n_users, n_items = train.shape
    r = sp.csr_matrix(train, dtype=np.float32)
    adj = sp.bmat([[None, r], [r.T, None]], format="csr", dtype=np.float32)
    degree = np.asarray(adj.sum(axis=1)).ravel()
    with np.errstate(divide="ignore"):
        inv_sqrt = np.where(degree > 0, degree ** -0.5, 0.0).astype(np.float32)
    d = sp.diags(inv_sqrt)
    out = (d @ adj @ d).tocsr()
    out.sort_indices()
    return out


class DegreeSensitivePruner:
    """FREEDOM's degree-sensitive edge pruning of the interaction graph: each epoch keeps a share of
    the training edges, drawn without replacement with probability ∝ 1/√(deg_u · deg_i), so edges
    between popular nodes are pruned first. One implementation for every model that prunes.

    Each epoch's draw comes from (``seed``, epoch): a resumed run prunes as the interrupted one
    would have, and runs with different seeds prune differently (so a seed sd includes the pruning)."""

    def __init__(self, train: sp.spmatrix, seed: int):
        self.seed = seed
        coo = sp.coo_matrix(train)
        self.shape = coo.shape
        self.rows, self.cols = coo.row, coo.col
        deg_u = np.bincount(self.rows, minlength=self.shape[0])
        deg_i = np.bincount(self.cols, minlength=self.shape[1])
        w = 1.0 / np.sqrt(deg_u[self.rows] * deg_i[self.cols])
        self.edge_p = w / w.sum()

    def sample(self, dropout: float, epoch: int) -> sp.csr_matrix:
        """Epoch ``epoch``'s kept edges as a binary user x item matrix (``dropout``: the share pruned)."""
        rng = np.random.default_rng([self.seed, epoch])
        n_keep = int(len(self.edge_p) * (1.0 - dropout))
        keep = rng.choice(len(self.edge_p), size=n_keep, replace=False, p=self.edge_p)
        return sp.csr_matrix((np.ones(n_keep, dtype=np.float32), (self.rows[keep], self.cols[keep])), shape=self.shape)


def adjacency_blocks(adj: sp.csr_matrix, n_users: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(R̂, R̂ᵀ) with R̂ = D_u^-1/2 R D_i^-1/2: the two off-diagonal blocks of the normalised Â."""
    r_hat = adj[:n_users, n_users:].tocsr()
    r_hat_t = adj[n_users:, :n_users].tocsr()
    r_hat.sort_indices()
    r_hat_t.sort_indices()
    return r_hat, r_hat_t


def torch_adjacency_blocks(adj: sp.csr_matrix, n_users: int,
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`adjacency_blocks` as CSR tensors on ``device``."""
    r_hat, r_hat_t = adjacency_blocks(adj, n_users)
    return to_torch_csr(r_hat, device), to_torch_csr(r_hat_t, device)


def to_torch_csr(matrix: sp.spmatrix, device: torch.device | str = "cpu") -> torch.Tensor:
    m = sp.csr_matrix(matrix, dtype=np.float32)
    m.sort_indices()
    # 32-bit indices where they fit: MKL's CSR product takes them as they are, where 64-bit ones
    # are converted on every call (measured here: 1.9 ms instead of 2.4 ms for Baby's Â @ 64 columns).
    index_type = np.int32 if max(m.nnz, *m.shape) < np.iinfo(np.int32).max else np.int64
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(m.indptr.astype(index_type)),
            torch.from_numpy(m.indices.astype(index_type)),
            torch.from_numpy(m.data),
            size=m.shape,
            device=device,
            check_invariants=False,  # built by scipy from a canonical CSR: valid by construction
        )


def _layer_scale(layers: int, combine: str) -> float:
    """The factor of Σ_{l=0..L}: 1/(L+1) for the mean of the layers, 1 for their sum."""
    return 1.0 / (layers + 1) if combine == "mean" else 1.0


def _layer_sum(adj: torch.Tensor, x: torch.Tensor, layers: int) -> torch.Tensor:
    """Σ_{l=0..L} Âˡ x, as a fresh tensor."""
    out, h = x.clone(), x
    for _ in range(layers):
        h = spmm(adj, h)
        out.add_(h)
    return out


def _layer_sum_backward(adj: torch.Tensor, seed: torch.Tensor, layers: int) -> torch.Tensor:
    """Σ_{l=0..L} Âˡ seed for a symmetric Â, by Horner's rule (g ← seed + Â g): the gradient of
    :func:`_layer_sum`. ``seed`` is left as it is when ``layers`` > 0."""
    acc = seed
    for _ in range(layers):
        acc = spmm(adj, acc).add_(seed)
    return acc


class _PropagateRows(torch.autograd.Function):
    """Rows ``index`` of scale * Σ_{l=0..L} Âˡ E for a symmetric Â, with a hand-written backward.

    Only the gathered rows are summed in the forward pass, and the backward pass is one scatter
    plus L sparse products (Horner: g ← s + Â g), instead of autograd's chain of full-size adds,
    divisions and index backwards: the step of a LightGCN-style model gets about a third cheaper.
    """

    @staticmethod
    def forward(ctx, adj, ego, index, layers, scale):
        out = ego[index]
        h = ego
        for _ in range(layers):
            h = spmm(adj, h)
            out = out + h[index]
        ctx.adj, ctx.layers, ctx.scale, ctx.n = adj, layers, scale, ego.shape[0]
        ctx.save_for_backward(index)
        return out * scale

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        seed = torch.zeros((ctx.n, grad.shape[1]), dtype=grad.dtype, device=grad.device)
        seed.index_add_(0, index, grad * ctx.scale)
        return None, _layer_sum_backward(ctx.adj, seed, ctx.layers), None, None, None


SPMM_COLUMNS = 64  # wider dense operands are multiplied in slices: narrow ones stay in cache


def spmm(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """adj @ x for a sparse CSR ``adj``; slices of at most SPMM_COLUMNS columns (measured here:
    one 192-column product costs about 1.6x three 64-column ones)."""
    if x.shape[1] <= SPMM_COLUMNS:
        return torch.sparse.mm(adj, x)
    return torch.cat([torch.sparse.mm(adj, part.contiguous()) for part in x.split(SPMM_COLUMNS, dim=1)], dim=1)


class _Propagate(torch.autograd.Function):
    """scale * Σ_{l=0..L} Âˡ E for a symmetric Â: forward L products, backward L products (Horner),
    with no intermediate tensors kept for autograd."""

    @staticmethod
    def forward(ctx, adj, ego, layers, scale):
        out = _layer_sum(adj, ego, layers)
        ctx.adj, ctx.layers, ctx.scale = adj, layers, scale
        return out.mul_(scale) if scale != 1.0 else out

    @staticmethod
    def backward(ctx, grad):
        seed = grad * ctx.scale if ctx.scale != 1.0 else grad
        return None, _layer_sum_backward(ctx.adj, seed, ctx.layers), None, None


def _stack_rows(users: torch.Tensor, items: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(X, 1/||row|| or None): X = [users; items], L2-row-normalised when asked, a fresh tensor."""
    x = torch.cat([users, items])
    if not normalize:
        return x, None
    inv_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_()
    return x.mul_(inv_norm), inv_norm


def _stack_rows_backward(grad: torch.Tensor, x: torch.Tensor, inv_norm: torch.Tensor | None) -> torch.Tensor:
    """The gradient of :func:`_stack_rows`, in place on ``grad``; through the normalisation it is
    (g - x (g·x)) / ||v||, x the normalised row."""
    if inv_norm is None:
        return grad
    along = torch.linalg.vecdot(grad, x).unsqueeze(1)
    return grad.addcmul_(x, along, value=-1).mul_(inv_norm)


class _BranchPropagate(torch.autograd.Function):
    """scale * Σ_{l=0..L} Âˡ X with X = [users; items], optionally L2-row-normalised, for a symmetric Â.

    One function for the stack, the normalisation and the propagation, so that the backward
    pass makes three passes over the N x d gradient for the normalisation instead of autograd's
    dozen (divisions, products, masks and sums of the chain rule), and keeps no intermediates.
    """

    @staticmethod
    def forward(ctx, adj, users, items, layers, scale, normalize):
        x, inv_norm = _stack_rows(users, items, normalize)
        out = _layer_sum(adj, x, layers)
        ctx.save_for_backward(x, inv_norm)
        ctx.adj, ctx.layers, ctx.scale, ctx.n_users = adj, layers, scale, users.shape[0]
        if scale != 1.0:
            out.mul_(scale)
        # Users and items as two outputs: slicing one output would cost a zero-filled N x d
        # gradient per slice in the backward pass.
        return out[: ctx.n_users], out[ctx.n_users :]

    @staticmethod
    def backward(ctx, grad_users, grad_items):
        x, inv_norm = ctx.saved_tensors
        grad_users = torch.zeros_like(x[: ctx.n_users]) if grad_users is None else grad_users
        grad_items = torch.zeros_like(x[ctx.n_users :]) if grad_items is None else grad_items
        seed = torch.cat([grad_users, grad_items])
        if ctx.scale != 1.0:
            seed.mul_(ctx.scale)
        # seed is a fresh tensor (the cat above): the in-place normalisation backward may reuse it.
        acc = _stack_rows_backward(_layer_sum_backward(ctx.adj, seed, ctx.layers), x, inv_norm)
        return None, acc[: ctx.n_users], acc[ctx.n_users :], None, None, None


class _BranchPropagateItems(torch.autograd.Function):
    """The item rows only of scale * Σ_{l=0..L} Âˡ X, X = [users; items], optionally L2-row-normalised.

    With Â = [[0, R̂], [R̂ᵀ, 0]] a layer maps (users, items) to (R̂ items, R̂ᵀ users), so the item rows
    of the last layer need one block product, not two; and a gradient on item rows only alternates
    between the two sides, one block product a layer. For L = 2: 5 block products instead of the 8
    of the full propagation (each block product is half of one with Â).
    """

    @staticmethod
    def forward(ctx, r_hat, r_hat_t, users, items, layers, scale, normalize):
        n_users = users.shape[0]
        x, inv_norm = _stack_rows(users, items, normalize)
        x_users, x_items = x[:n_users], x[n_users:]
        out = x_items.clone()
        a, b = x_users, x_items  # user and item rows of Âˡ X
        for layer in range(1, layers + 1):
            if layer < layers:
                a, b = spmm(r_hat, b), spmm(r_hat_t, a)
            else:
                b = spmm(r_hat_t, a)
            out.add_(b)
        ctx.save_for_backward(x, inv_norm)
        ctx.blocks, ctx.layers, ctx.scale, ctx.n_users = (r_hat, r_hat_t), layers, scale, n_users
        return out.mul_(scale) if scale != 1.0 else out

    @staticmethod
    def backward(ctx, grad_items):
        x, inv_norm = ctx.saved_tensors
        r_hat, r_hat_t = ctx.blocks
        seed = grad_items * ctx.scale if ctx.scale != 1.0 else grad_items
        grad = torch.zeros_like(x)
        grad_users, grad_items_acc = grad[: ctx.n_users], grad[ctx.n_users :]
        grad_items_acc.add_(seed)
        # Âˡ [0; g] is [R̂ (Âˡ⁻¹ ..)_items ; 0] for odd l and [0 ; R̂ᵀ (..)_users] for even l.
        side, h = "items", seed
        for _ in range(ctx.layers):
            if side == "items":
                h, side = spmm(r_hat, h), "users"
                grad_users.add_(h)
            else:
                h, side = spmm(r_hat_t, h), "items"
                grad_items_acc.add_(h)
        grad = _stack_rows_backward(grad, x, inv_norm)
        return None, None, grad[: ctx.n_users], grad[ctx.n_users :], None, None, None


class _FrozenProduct(torch.autograd.Function):
    """M @ x for a frozen sparse M whose transpose is kept: the backward pass is one CSR product,
    where torch's own would transpose and convert M to CSR again on every step."""

    @staticmethod
    def forward(ctx, matrix, transpose, x):
        ctx.transpose = transpose
        return spmm(matrix, x)

    @staticmethod
    def backward(ctx, grad):
        return None, None, spmm(ctx.transpose, grad.contiguous())


class FrozenGraph:
    """A frozen sparse graph (the item-item kNN graph, DiffCL's user-user graph) to multiply
    trainable tensors with."""

    def __init__(self, matrix: sp.spmatrix, device: torch.device | str = "cpu"):
        self.matrix = to_torch_csr(matrix, device)
        symmetric = (abs(matrix - matrix.T) > 1e-7).nnz == 0
        self.transpose = self.matrix if symmetric else to_torch_csr(sp.csr_matrix(matrix).T, device)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenProduct.apply(self.matrix, self.transpose, x)


def propagate(adj: torch.Tensor, ego: torch.Tensor, layers: int, combine: str) -> torch.Tensor:
    """The LightGCN layer combination (mean or sum of Âˡ E, l = 0..L) of every row."""
    return _Propagate.apply(adj, ego, layers, _layer_scale(layers, combine))


def branch_propagate(adj: torch.Tensor, users: torch.Tensor, items: torch.Tensor, layers: int,
                     combine: str, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer combination (mean or sum of Âˡ X, l = 0..L) of X = [users; items] (L2-row-normalised
    when ``normalize``), as (user rows, item rows)."""
    return _BranchPropagate.apply(adj, users, items, layers, _layer_scale(layers, combine), normalize)


def branch_propagate_items(blocks: tuple[torch.Tensor, torch.Tensor], users: torch.Tensor, items: torch.Tensor,
                           layers: int, combine: str, normalize: bool = False) -> torch.Tensor:
    """The item rows of :func:`branch_propagate`, from the blocks (R̂, R̂ᵀ) of Â: for a branch
    whose user rows nothing reads."""
    return _BranchPropagateItems.apply(*blocks, users, items, layers, _layer_scale(layers, combine), normalize)


def propagate_rows(adj: torch.Tensor, ego: torch.Tensor, index: torch.Tensor, layers: int, combine: str) -> torch.Tensor:
    """Rows ``index`` of the LightGCN layer combination (mean or sum of Âˡ E, l = 0..L)."""
    return _PropagateRows.apply(adj, ego, index, layers, _layer_scale(layers, combine))


def knn_graph(
    features: np.ndarray | torch.Tensor, k: int = 10, chunk: int = 4096, include_self: bool = True,
    ann_above: int | None = None,
) -> sp.csr_matrix:
    """Cosine kNN graph over item features, binary edges, normalised as FREEDOM does
    (value d_i^-1/2 d_j^-1/2 with d the out-degree, i.e. 1/k on every edge).

    Exact, in row chunks with ``torch.topk``: memory is O(chunk x I + I x k), never I x I.
    Above ``ann_above`` items (``graphs.ann_above``) the approximate FAISS backend of
    :mod:`diffcl.ann` builds it instead, in the same format.
    ``include_self`` keeps the item among its own neighbours (the top-k of a full similarity row,
    as FREEDOM and LATTICE build it).
    """
    n = len(features)
    if ann_above is not None and n > ann_above:
        return faiss_knn_graph(features, k, include_self)
    k_eff = neighbour_count(n, k, include_self)
    if k_eff <= 0:
        return sp.csr_matrix((n, n), dtype=np.float32)
    x = normalized_rows(features)
    return neighbour_graph(exact_neighbours(x, np.arange(n), k_eff, include_self, chunk), n)


def user_cooccurrence_graph(train: sp.spmatrix, k: int, chunk: int = 2048) -> sp.csr_matrix:
    """DRAGON's user-user graph: each user's ``k`` users with the most items in common (ties by
    index, no self-loops), edge values the common-item counts normalised to sum 1 per row, so
    ``U @ x`` is a weighted mean of the neighbours' rows. Frozen, from the training split only.

    In row chunks of R Rᵀ: memory O(chunk x U) at worst, never U x U."""
    r = sp.csr_matrix(train, dtype=np.float32, copy=True)  # the caller's matrix keeps its values
    r.data[:] = 1.0
    n = r.shape[0]
    rows, cols, vals = [], [], []
    for start in range(0, n, chunk):
        block = (r[start : start + chunk] @ r.T).tocsr()
        for offset in range(block.shape[0]):
            user = start + offset
            lo, hi = block.indptr[offset], block.indptr[offset + 1]
            neighbours, counts = block.indices[lo:hi], block.data[lo:hi]
            keep = (neighbours != user) & (counts > 0)
            neighbours, counts = neighbours[keep], counts[keep]
            if len(neighbours) > k:
                top = np.lexsort((neighbours, -counts))[:k]
                neighbours, counts = neighbours[top], counts[top]
            if len(neighbours):
                rows.append(np.full(len(neighbours), user))
                cols.append(neighbours)
                vals.append(counts / counts.sum())
    if not rows:
        return sp.csr_matrix((n, n), dtype=np.float32)
    return sp.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n, n))


def fusion_weights(modalities: list[str], configured: Mapping[str, float]) -> dict[str, float]:
    """The weight of each fused modality: its configured weight (1/n where none is listed, n the number
    fused), renormalised over the modalities fused so that the weights sum to 1."""
    raw = {m: float(configured.get(m, 1.0 / len(modalities))) for m in modalities}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"graphs.modality_weights: the weights of {modalities} sum to 0; give one a positive weight")
    return {m: w / total for m, w in raw.items()}


def fuse_item_graphs(graphs: dict[str, sp.csr_matrix], weights: Mapping[str, float]) -> sp.csr_matrix | None:
    """S = Σ_m w_m S_m over the given modalities' graphs, with :func:`fusion_weights`; a single
    modality's graph alone when only one exists."""
    if not graphs:
        return None
    if len(graphs) == 1:
        return next(iter(graphs.values())).tocsr()
    w = fusion_weights(list(graphs), weights)
    fused = sum(w[m] * g for m, g in graphs.items())
    return sp.csr_matrix(fused, dtype=np.float32)
