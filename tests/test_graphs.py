import numpy as np
import pytest
import scipy.sparse as sp
import torch

from diffcl.graphs import (
    DegreeSensitivePruner,
    fuse_item_graphs,
    knn_graph,
    normalized_adjacency,
    propagate_rows,
    to_torch_csr,
    user_cooccurrence_graph,
)


def test_normalized_adjacency_against_dense_formula():
    rng = np.random.default_rng(0)
    r = (rng.random((7, 5)) < 0.4).astype(np.float32)
    r[3] = 0  # a user without interactions
    got = normalized_adjacency(sp.csr_matrix(r)).toarray()
    a = np.block([[np.zeros((7, 7)), r], [r.T, np.zeros((5, 5))]])
    deg = a.sum(1)
    with np.errstate(divide="ignore"):
        inv = np.where(deg > 0, deg ** -0.5, 0)
    np.testing.assert_allclose(got, inv[:, None] * a * inv[None, :], rtol=1e-6)
    np.testing.assert_allclose(got, got.T)
    assert np.all(np.diag(got) == 0)


def brute_knn(x: np.ndarray, k: int) -> set[tuple[int, int]]:
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = xn @ xn.T
    edges = set()
    for i in range(len(x)):
        for j in np.argsort(-sim[i], kind="stable")[:k]:
            edges.add((i, int(j)))
    return edges


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_knn_graph_matches_dense_brute_force(seed, chunk):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(53, 6)).astype(np.float32)
    graph = knn_graph(x, k=5, chunk=chunk)
    coo = graph.tocoo()
    assert set(zip(coo.row.tolist(), coo.col.tolist(), strict=True)) == brute_knn(x, 5)
    np.testing.assert_allclose(coo.data, 1 / 5)
    assert np.all(np.asarray(graph.sum(axis=1)).ravel() == pytest.approx(1.0))


def test_knn_without_self_and_tiny_catalogue():
    x = np.eye(4, dtype=np.float32) + 0.1
    graph = knn_graph(x, k=10, include_self=False)
    assert graph.diagonal().sum() == 0 and graph.nnz == 4 * 3


def test_fused_graph_weights():
    a = sp.identity(3, format="csr", dtype=np.float32)
    b = sp.csr_matrix(np.ones((3, 3), dtype=np.float32))
    weights = {"image": 0.1, "text": 0.9}  # graphs.modality_weights' default
    fused = fuse_item_graphs({"image": a, "text": b}, weights).toarray()
    np.testing.assert_allclose(fused, 0.1 * np.eye(3) + 0.9 * np.ones((3, 3)), rtol=1e-6)
    assert fuse_item_graphs({"text": b}, weights).toarray().tolist() == b.toarray().tolist()
    assert fuse_item_graphs({}, weights) is None


def _adjacency(seed=0):
    rng = np.random.default_rng(seed)
    r = sp.csr_matrix((rng.random((9, 6)) < 0.4).astype(np.float32))
    return to_torch_csr(normalized_adjacency(r)), 15


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_propagate_rows_matches_autograd_reference(combine):
    adj, n = _adjacency(1)
    dense = adj.to_dense()
    ego = torch.randn(n, 4, requires_grad=True)
    index = torch.tensor([0, 3, 3, 10, 14])
    weights = torch.randn(len(index), 4)
    (propagate_rows(adj, ego, index, 2, combine) * weights).sum().backward()
    got = ego.grad.clone()

    ego.grad = None
    h1 = dense @ ego
    out = ego + h1 + dense @ h1
    out = out / 3 if combine == "mean" else out
    (out[index] * weights).sum().backward()
    np.testing.assert_allclose(got.numpy(), ego.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_propagate_matches_autograd_reference(combine):
    from diffcl.graphs import propagate

    adj, n = _adjacency(2)
    dense = adj.to_dense()
    ego = torch.randn(n, 3, requires_grad=True)
    weights = torch.randn(n, 3)
    out = propagate(adj, ego, 2, combine)
    (out * weights).sum().backward()
    got_out, got_grad = out.detach().clone(), ego.grad.clone()
    ego.grad = None
    h1 = dense @ ego
    ref = ego + h1 + dense @ h1
    ref = ref / 3 if combine == "mean" else ref
    (ref * weights).sum().backward()
    np.testing.assert_allclose(got_out.numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_grad.numpy(), ego.grad.numpy(), rtol=1e-5, atol=1e-6)


def _reference_propagation(dense, users, items, layers, combine, normalize=True):
    x = torch.cat([users, items])
    x = torch.nn.functional.normalize(x, dim=1) if normalize else x
    out, h = x, x
    for _ in range(layers):
        h = dense @ h
        out = out + h
    return out / (layers + 1) if combine == "mean" else out


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_branch_propagate_matches_autograd_reference(combine, layers, normalize):
    from diffcl.graphs import branch_propagate

    adj, n = _adjacency(3)
    dense = adj.to_dense()
    users = torch.randn(9, 5, requires_grad=True)
    items = torch.randn(6, 5, requires_grad=True)
    weights = torch.randn(n, 5)
    out = torch.cat(branch_propagate(adj, users, items, layers, combine, normalize))
    (out * weights).sum().backward()
    got = [out.detach().clone(), users.grad.clone(), items.grad.clone()]
    users.grad = items.grad = None
    ref = _reference_propagation(dense, users, items, layers, combine, normalize)
    (ref * weights).sum().backward()
    for a, b in zip(got, [ref.detach(), users.grad, items.grad], strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)

    # A loss on the item rows alone: the users' rows get gradient through the graph only.
    users.grad = items.grad = None
    (branch_propagate(adj, users, items, layers, combine, normalize)[1] * weights[9:]).sum().backward()
    got_users = users.grad.clone()
    users.grad = None
    (_reference_propagation(dense, users, items, layers, combine, normalize)[9:] * weights[9:]).sum().backward()
    np.testing.assert_allclose(got_users.numpy(), users.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("combine", ["mean", "sum"])
@pytest.mark.parametrize("layers", [0, 1, 2, 3])
def test_item_rows_only_propagation_matches_the_full_one(combine, layers, normalize):
    from diffcl.graphs import adjacency_blocks, branch_propagate_items

    rng = np.random.default_rng(6)
    r = sp.csr_matrix((rng.random((9, 6)) < 0.4).astype(np.float32))
    blocks = tuple(to_torch_csr(b) for b in adjacency_blocks(normalized_adjacency(r), 9))
    dense = to_torch_csr(normalized_adjacency(r)).to_dense()
    np.testing.assert_allclose(blocks[0].to_dense().numpy(), dense[:9, 9:].numpy())
    users = torch.randn(9, 5, requires_grad=True)
    items = torch.randn(6, 5, requires_grad=True)
    weights = torch.randn(6, 5)
    out = branch_propagate_items(blocks, users, items, layers, combine, normalize)
    (out * weights).sum().backward()
    got = [out.detach().clone(), users.grad.clone(), items.grad.clone()]
    users.grad = items.grad = None
    ref = _reference_propagation(dense, users, items, layers, combine, normalize)[9:]
    (ref * weights).sum().backward()
    for a, b in zip(got, [ref.detach(), users.grad, items.grad], strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_frozen_graph_product_and_gradient_match_dense():
    from diffcl.graphs import FrozenGraph

    rng = np.random.default_rng(4)
    directed = knn_graph(rng.standard_normal((12, 6)).astype(np.float32), k=3)
    assert (abs(directed - directed.T) > 0).nnz > 0  # a kNN graph is not symmetric: the transpose matters
    graph = FrozenGraph(directed)
    x = torch.randn(12, 4, requires_grad=True)
    weights = torch.randn(12, 4)
    out = graph @ x
    (out * weights).sum().backward()
    dense = torch.tensor(directed.toarray())
    np.testing.assert_allclose(out.detach().numpy(), (dense @ x).detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x.grad.numpy(), (dense.T @ weights).numpy(), rtol=1e-5, atol=1e-6)


def test_csr_uses_32_bit_indices_where_they_fit():
    adj, _ = _adjacency(5)
    assert adj.crow_indices().dtype == torch.int32 and adj.col_indices().dtype == torch.int32


def test_allocator_tuning_is_applied_once_and_harmless():
    import platform

    from diffcl.core.device import keep_freed_memory

    first = keep_freed_memory()
    assert keep_freed_memory() is first  # cached: applied once per process
    if platform.libc_ver()[0] == "glibc":
        assert first is True  # glibc's mallopt accepted both settings
    x = torch.randn(2000, 64)
    torch.testing.assert_close(x.clone(), x)


def test_degree_sensitive_pruning_keeps_the_share_and_prunes_popular_edges_first():
    # User 0 and item 0 are popular (a star); users 1-4 each have one edge of their own to a cold item.
    rows = np.array([0, 0, 0, 0, 1, 2, 3, 4, 1, 2, 3, 4])
    cols = np.array([0, 1, 2, 3, 0, 0, 0, 0, 5, 6, 7, 8])
    train = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(5, 9))
    pruner = DegreeSensitivePruner(train, seed=7)
    kept = pruner.sample(0.5, epoch=3)
    assert kept.nnz == 6 and set(kept.data) == {1.0}
    assert not (kept - kept.multiply(train)).nnz  # only training edges are kept
    # The same (seed, epoch) draws the same edges (a resumed run); another run seed draws others.
    torch.testing.assert_close(torch.from_numpy(pruner.sample(0.5, epoch=3).toarray()), torch.from_numpy(kept.toarray()))
    other_seeds = [DegreeSensitivePruner(train, seed=s).sample(0.5, epoch=3).toarray() for s in range(8, 14)]
    assert any((draw != kept.toarray()).any() for draw in other_seeds)
    cold = [(u, i) for u, i in zip(rows, cols, strict=True) if i >= 5]
    hub = (0, 0)
    draws = [pruner.sample(0.5, epoch=e).toarray() for e in range(200)]
    kept_cold = np.mean([d[u, i] for d in draws for u, i in cold])
    assert kept_cold > 0.6 and np.mean([d[hub] for d in draws]) < 0.4  # 1/sqrt(deg_u deg_i): 0.71 vs 0.2


def test_user_cooccurrence_graph_keeps_each_users_top_k_by_common_items():
    train = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32))
    graph = user_cooccurrence_graph(train, k=2, chunk=2).toarray()  # chunks smaller than the users
    # User 0 shares two items with user 1 and one with user 3; never itself.
    np.testing.assert_allclose(graph[0], [0, 2 / 3, 0, 1 / 3, 0], rtol=1e-6)
    # User 1 shares 2 items with user 0 and 1 each with users 2 and 3: the top 2 keep the most
    # common items, the tie going to the lower index.
    np.testing.assert_allclose(graph[1], [2 / 3, 0, 1 / 3, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(graph[2], [0, 1, 0, 0, 0])  # one co-interacting user only
    assert not graph[4].any() and not np.diag(graph).any()  # a user without items has no neighbours
    np.testing.assert_allclose(graph.sum(axis=1), [1, 1, 1, 1, 0], rtol=1e-6)
    assert ((graph > 0).sum(axis=1) <= 2).all()
