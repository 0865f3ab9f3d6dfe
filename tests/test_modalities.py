"""Any number of named modalities, and MMRec folders taken as published (issue 11, parts 1 and 2):
``<name>_feat.npy`` of any name, cold-start users dropped and counted, no re-filtering of a shipped
split unless asked, the fused item graph over 1-3 modalities, FREEDOM on 1-3 modalities, and
feature files named in the config. Tiny synthetic data throughout."""

import json

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp
import torch

from diffcl.core.config import ConfigError, ModelConfig, load_config
from diffcl.core.feature_files import available_features, read_features
from diffcl.core.workspace import DatasetDirs
from diffcl.data import InteractionData
from diffcl.graphs import fuse_item_graphs, fusion_weights, knn_graph
from diffcl.models.base import Batch, ModelContext
from diffcl.models.freedom import Freedom
from diffcl.training.run import build_run
from pipeline.embed import run_features
from pipeline.graphs import build_graphs, load_graph
from pipeline.prepare import prepare

N_USERS, N_ITEMS = 40, 24
COLD_USERS = (37, 38, 39)  # valid / test interactions only: no training interaction
UNSEEN_ITEM = 22  # in no interaction at all, yet a row of every feature matrix
WIDTHS = {"image": 6, "text": 5, "audio": 4}


@pytest.fixture(scope="module")
def mmrec_folder(tmp_path_factory):
    """An MMRec folder with a shipped split and three modalities; each feature row encodes its
    itemID (column 0), so that alignment can be read back."""
    folder = tmp_path_factory.mktemp("mmrec-3")
    rng = np.random.default_rng(0)
    rows = []
    for user in range(N_USERS):
        items = rng.choice([i for i in range(N_ITEMS) if i != UNSEEN_ITEM], size=6, replace=False)
        labels = [1, 2] if user in COLD_USERS else [0, 0, 0, 0, 1, 2]
        rows += [(user, int(item), label) for item, label in zip(items, labels, strict=False)]
    lines = ["userID\titemID\tx_label"] + [f"{u}\t{i}\t{x}" for u, i, x in rows]
    (folder / "toy.inter").write_text("\n".join(lines) + "\n")
    for name, width in WIDTHS.items():
        matrix = rng.normal(size=(N_ITEMS, width)).astype(np.float32)
        matrix[:, 0] = np.arange(N_ITEMS)
        np.save(folder / f"{name}_feat.npy", matrix)
    return folder, rows


def _config(tmp_path, folder, *overrides, **sections):
    data = {"workspace": str(tmp_path / "ws"), "dataset": {"name": "toy", "source": "mmrec", "path": str(folder)},
            **sections}
    return load_config(data, list(overrides))


def _stats(config) -> dict:
    return json.loads((DatasetDirs.of(config.workspace, config.dataset.name).prepared / "stats.json").read_text())


def test_shipped_split_is_taken_as_published_cold_start_users_dropped_and_counted(tmp_path, mmrec_folder):
    folder, rows = mmrec_folder
    config = _config(tmp_path, folder)
    stats = prepare(config, progress=False).stats
    cold_rows = sum(1 for u, _, _ in rows if u in COLD_USERS)
    assert stats["kcore"] == 1 and stats["split"] == "shipped"  # auto: no re-filtering
    assert stats["cold_start_users"] == len(COLD_USERS) and stats["cold_start_interactions"] == cold_rows
    assert _stats(config)["cold_start_users"] == len(COLD_USERS)
    assert stats["users"] == N_USERS - len(COLD_USERS) and stats["interactions"] == len(rows) - cold_rows
    # Every item is kept with its feature row (item i = itemID i), the unseen one too.
    prepared = DatasetDirs.of(config.workspace, "toy").prepared
    items = pl.read_parquet(prepared / "items.parquet")
    assert stats["items"] == N_ITEMS and items.get_column("source_row").to_list() == list(range(N_ITEMS))
    users = pl.read_parquet(prepared / "users.parquet")
    assert users.get_column("user").to_list() == list(range(N_USERS - len(COLD_USERS)))
    assert not set(users.get_column("user_id").to_list()) & {str(u) for u in COLD_USERS}
    data = InteractionData.load(prepared)
    assert (np.diff(data.train.indptr) > 0).all()  # every remaining user trains


def test_explicit_kcore_filters_a_shipped_split(tmp_path, mmrec_folder):
    folder, _ = mmrec_folder
    default = prepare(_config(tmp_path / "a", folder), progress=False).stats
    filtered = prepare(_config(tmp_path / "b", folder, "prepare.kcore=3"), progress=False).stats
    # The 3-core removes the cold users (2 interactions each) and the item without interactions.
    assert filtered["kcore"] == 3 and filtered["cold_start_users"] == 0
    assert filtered["users"] == default["users"] == N_USERS - len(COLD_USERS)
    assert filtered["items"] == default["items"] - 1 == N_ITEMS - 1


def test_mmrec_feature_files_of_any_name_are_imported(tmp_path, mmrec_folder):
    folder, _ = mmrec_folder
    config = _config(tmp_path, folder)
    assert prepare(config, progress=False).stats["precomputed_features"].keys() == set(WIDTHS)
    reports = {r.modality: r.status for r in run_features(config, progress=False)}
    assert reports == {"text": "imported", "image": "imported", "audio": "imported"}
    features = available_features(DatasetDirs.of(config.workspace, "toy").features)
    assert list(features) == ["audio", "image", "text"]  # image_sources.parquet is no modality
    for name, path in features.items():
        matrix, meta = read_features(path)
        assert matrix.shape == (N_ITEMS, WIDTHS[name]) and meta["modality"] == name
        assert matrix[:, 0].tolist() == list(range(N_ITEMS))  # row = itemID
    # The graph stage builds each modality's kNN graph; the model context fuses those a model reads.
    report = build_graphs(config)
    assert set(report["graphs"]) == {"knn_audio", "knn_image", "knn_text"}
    graphs = DatasetDirs.of(config.workspace, "toy").graphs
    # A model reads the modalities it names, in its order.
    trainer = build_run(_config(tmp_path, folder, "model.name=freedom", "model.freedom.modalities=[audio, image]",
                              "train.epochs=1", "train.threads=1"))
    assert trainer.model.modalities == ["audio", "image"]
    assert load_graph(graphs / "knn_audio.npz").shape == (N_ITEMS, N_ITEMS)


def test_config_feature_files_are_imported(tmp_path, mmrec_folder):
    folder, _ = mmrec_folder
    ids = [str(i) for i in range(N_ITEMS)]  # the dataset's item ids (no id map: the itemIDs)
    style = np.arange(N_ITEMS * 3, dtype=np.float32).reshape(N_ITEMS, 3)
    order = np.random.default_rng(1).permutation(N_ITEMS)  # any row order: matched by item_id
    pl.DataFrame({"item_id": [ids[i] for i in order], "embedding": style[order].tolist()}).write_parquet(
        tmp_path / "style.parquet")
    np.save(tmp_path / "extra.npy", -style)
    config = _config(tmp_path, folder, features={"files": {"style": str(tmp_path / "style.parquet"),
                                                           "extra": str(tmp_path / "extra.npy")}})
    prepare(config, progress=False)
    reports = {r.modality: r.status for r in run_features(config, progress=False)}
    assert reports["style"] == reports["extra"] == "imported"
    features = DatasetDirs.of(config.workspace, "toy").features
    assert np.array_equal(read_features(features / "style.parquet")[0], style)
    assert np.array_equal(read_features(features / "extra.parquet")[0], -style)
    # Dropping the entry removes the modality's file on the next run: no stale modality lingers.
    run_features(_config(tmp_path, folder), progress=False)
    assert "style" not in available_features(features)


def test_modality_names_are_identifiers_and_image_weight_is_renamed(tmp_path, mmrec_folder):
    folder, _ = mmrec_folder
    with pytest.raises(ConfigError, match=r"features\.files\.2d.*must be an identifier"):
        _config(tmp_path, folder, features={"files": {"2d": "x.npy"}})
    with pytest.raises(ConfigError, match=r"model\.freedom\.modalities\.0.*other than id"):
        _config(tmp_path, folder, "model.freedom.modalities=[id]")
    with pytest.raises(ConfigError, match=r"graphs\.image_weight was replaced by graphs\.modality_weights"):
        _config(tmp_path, folder, "graphs.image_weight=0.2")


# ------------------------------------------------------------------------------ fused item graph
def _graphs(n=5):
    rng = np.random.default_rng(2)
    return {m: sp.csr_matrix(rng.random((n, n)).astype(np.float32)) for m in ("image", "text", "audio")}


def test_fused_item_graph_over_one_two_three_modalities():
    g = _graphs()
    default = {"image": 0.1, "text": 0.9}
    # One: the graph itself. Two (image + text): exactly 0.1 / 0.9, as before modalities had names.
    assert (fuse_item_graphs({"audio": g["audio"]}, default) != g["audio"]).nnz == 0
    two = fuse_item_graphs({"image": g["image"], "text": g["text"]}, default)
    assert np.array_equal(two.toarray(), (0.1 * g["image"] + 0.9 * g["text"]).toarray())
    assert fusion_weights(["image", "text"], default) == {"image": 0.1, "text": 0.9}
    # Three: the unlisted audio weighs 1/3, then all are renormalised to sum 1.
    w = fusion_weights(["image", "text", "audio"], default)
    assert w == pytest.approx({"image": 0.1 / (4 / 3), "text": 0.9 / (4 / 3), "audio": (1 / 3) / (4 / 3)})
    three = fuse_item_graphs(g, default).toarray()
    np.testing.assert_allclose(three, sum(w[m] * g[m].toarray() for m in g), rtol=1e-6)
    # Weights are relative: renormalised over the modalities present; none at all is an error.
    assert fusion_weights(["image", "audio"], {"image": 2.0, "audio": 6.0}) == {"image": 0.25, "audio": 0.75}
    assert fusion_weights(["image", "audio"], {}) == {"image": 0.5, "audio": 0.5}
    with pytest.raises(ValueError, match="modality_weights.*sum to 0"):
        fusion_weights(["image", "text"], {"image": 0.0, "text": 0.0})


# ---------------------------------------------------------------------------------------- FREEDOM
def _context(modalities: dict[str, int]) -> ModelContext:
    rng = np.random.default_rng(3)
    dense = rng.random((30, 20)) < 0.2
    dense[np.arange(30), rng.integers(0, 20, 30)] = True  # every user has an item
    empty = sp.csr_matrix((30, 20), dtype=np.float32)
    ctx = ModelContext(data=InteractionData(30, 20, sp.csr_matrix(dense.astype(np.float32)), empty, empty),
                       modality_weights={"image": 0.1, "text": 0.9})
    for name, width in modalities.items():
        ctx.features[name] = rng.normal(size=(20, width)).astype(np.float32)
        ctx.knn_graphs[name] = knn_graph(ctx.features[name], 4)
    return ctx


@pytest.mark.parametrize("wanted", [["audio"], ["image", "text"], ["text", "audio", "image"]])
def test_freedom_trains_with_one_two_three_modalities(wanted):
    torch.manual_seed(0)
    ctx = _context({"image": 7, "text": 5, "audio": 3})
    assert ctx.modalities([*wanted, "missing", wanted[0]]) == wanted  # wanted order, only those present
    model = Freedom(ctx, ModelConfig(name="freedom", embedding_dim=8, freedom={"modalities": wanted}))
    assert model.modalities == wanted and set(model.projections) == set(wanted)
    assert model.item_graph is not None
    batch = Batch(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))
    parts = model.loss(batch)
    assert torch.isfinite(parts["loss"]) and {f"bpr_{m}" for m in wanted} <= set(parts)
    parts["loss"].backward()
    for m in wanted:
        grad = model.projections[m].weight.grad
        assert grad is not None and grad.abs().sum() > 0, m
        assert model.projections[m].weight.shape == (8, ctx.features[m].shape[1])
    with torch.no_grad():
        users, items = model.embeddings()
    assert users.shape == (30, 8) and items.shape == (20, 8)


DIFFCL_VIEWS = [
    {"target": "fused", "views": "two_samples"},
    {"target": "per_modality", "views": "cross_modal"},
    {"target": "per_modality", "views": "id_anchor"},
    {"target": "interactions", "views": "all_pairs"},
    {"target": "interactions", "views": "cross_modal"},
]


@pytest.mark.parametrize("views", DIFFCL_VIEWS, ids=lambda v: v["views"])
@pytest.mark.parametrize("wanted", [["audio"], ["image", "text"], ["text", "audio", "image"]])
def test_diffcl_trains_with_one_two_three_modalities(wanted, views):
    from diffcl.models.diffcl import DiffCL

    if views["views"] == "cross_modal" and len(wanted) < 2:
        pytest.skip("cross-modal views need two modalities")
    torch.manual_seed(0)
    ctx = _context({"image": 7, "text": 5, "audio": 3})
    settings = {"modalities": wanted, "diffusion": views, "cl_nodes": None, "id_in_score": True,
                "normalize_inputs": "modalities", "combine": "mean"}
    model = DiffCL(ctx, ModelConfig(name="diffcl", embedding_dim=8, diffcl=settings))
    assert model.modalities == wanted and model.branches == [*wanted, "id"]
    batch = Batch(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))
    parts = model.loss(batch)
    assert all(torch.isfinite(v) for v in parts.values()) and parts["cl"].item() > 0
    parts["loss"].backward()
    for m in wanted:
        grad = model.projections[m][0].weight.grad
        assert grad is not None and grad.abs().sum() > 0, m
        assert model.user_tables[m].grad.abs().sum() > 0, m
    assert model.item_id.grad.abs().sum() > 0 and model.user_tables["id"].grad.abs().sum() > 0
    with torch.no_grad():
        z = model.encode(model.branches)
        users, items = model.embeddings()
    # Concatenation in the wanted order, the ID branch added to every block.
    assert users.shape == (30, 8 * len(wanted)) and items.shape == (20, 8 * len(wanted))
    expected = torch.cat([z[m].items + z["id"].items for m in wanted], dim=1)
    torch.testing.assert_close(items, expected)


def test_id_anchored_views_contrast_each_modality_with_the_id_rows():
    from diffcl.models.diffcl import DiffCL

    torch.manual_seed(0)
    ctx = _context({"image": 7, "text": 5})
    settings = {"modalities": ["image", "text"], "alignment": False, "cl_nodes": None, "id_in_score": False,
                "diffusion": {"target": "per_modality", "views": "id_anchor"}}
    model = DiffCL(ctx, ModelConfig(name="diffcl", embedding_dim=8, diffcl=settings))
    # The ID branch is not scored here, yet its users are read by the contrast: computed in training.
    assert not model.id_items_only and model.branches_in_use(training=True) == ["image", "text", "id"]
    assert model.branches_in_use(training=False) == ["image", "text"]
    batch = Batch(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))
    parts = model.loss(batch)
    (parts["cl"]).backward()
    # The contrastive loss alone reaches the ID tables (the anchors) and each modality's projection.
    assert model.user_tables["id"].grad.abs().sum() > 0 and model.item_id.grad.abs().sum() > 0
    assert all(model.projections[m][0].weight.grad.abs().sum() > 0 for m in ("image", "text"))


def _diffcl(settings: dict, modalities=("image", "text")):
    from diffcl.models.diffcl import DiffCL

    torch.manual_seed(0)
    ctx = _context({m: w for m, w in {"image": 7, "text": 5, "audio": 3}.items() if m in modalities})
    settings = {"modalities": list(modalities), "cl_nodes": None, **settings}
    return ctx, DiffCL(ctx, ModelConfig(name="diffcl", embedding_dim=8, diffcl=settings))


BATCH = Batch(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4]), torch.tensor([5, 6, 7, 8]))


def test_generated_graphs_add_k_new_edges_per_user_and_train_their_denoiser():
    ctx, model = _diffcl({"diffusion": {"target": "interactions", "views": "all_pairs", "graph_k": 2, "graph_every": 2}})
    assert set(model.interaction_diffusions) == {"image", "text"} and not model.generated_adjacency
    before = model.embeddings()[1].detach().clone()
    model.start_epoch(2)  # not due yet: epochs 3, 5, ... regenerate
    assert not model.generated_adjacency
    model.start_epoch(3)
    train = ctx.data.train
    for m in ("image", "text"):
        adj = model.generated_adjacency[m].to_dense()
        user_item = adj[: ctx.n_users, ctx.n_users :] > 0
        assert torch.equal(user_item, adj[ctx.n_users :, : ctx.n_users].T > 0)  # symmetric
        # The training edges plus graph_k new items per user.
        assert user_item.sum().item() == train.nnz + 2 * ctx.n_users
        assert user_item[torch.from_numpy(train.toarray() > 0)].all()
    assert not torch.allclose(model.embeddings()[1], before)  # the modality branches read them
    # The generated edges are state: a fresh model loading the checkpoint scores with the same graphs.
    _, fresh = _diffcl({"diffusion": {"target": "interactions", "views": "all_pairs", "graph_k": 2, "graph_every": 2}})
    assert not fresh.generated_adjacency
    fresh.load_state_dict(model.state_dict())
    assert set(fresh.generated_adjacency) == {"image", "text"}
    torch.testing.assert_close(fresh.embeddings()[1], model.embeddings()[1])
    parts = model.loss(BATCH)
    assert parts["diff"].item() > 0 and parts["cl"].item() > 0
    parts["loss"].backward()
    assert model.interaction_diffusions["image"].denoiser.net[0].weight.grad.abs().sum() > 0
    # w/o diffusion: no generated graph, no denoiser loss.
    _, off = _diffcl({"diffusion": {"target": "interactions", "views": "all_pairs", "enabled": False}})
    off.start_epoch(3)
    assert not off.generated_adjacency and off.loss(BATCH)["diff"].item() == 0.0


def test_gumbel_top_k_draws_from_the_scores_softmax_and_never_an_excluded_item():
    from diffcl.models.diffcl import gumbel_perturbed

    torch.manual_seed(0)
    scores = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0, 0.0, float("-inf")]]).repeat(4000, 1)
    counts = {t: torch.bincount(gumbel_perturbed(scores * 100, t).topk(2, dim=1).indices.flatten(), minlength=7)
              for t in (0.05, 1.0, 100.0)}
    assert counts[0.05][:2].tolist() == [4000, 4000]  # cold: the plain top-k, whatever the scores' scale
    assert all(c[6] == 0 for c in counts.values())  # an excluded (-inf) item is never drawn
    assert counts[1.0][0] > counts[1.0][2] > counts[1.0][3] > 0  # warm: likelier the higher the score
    assert (counts[100.0][:6].float() / 8000 - 1 / 6).abs().max() < 0.03  # hot: uniform over the candidates


def test_sampled_generated_edges_are_k_new_items_per_user():
    settings = {"diffusion": {"target": "interactions", "views": "generated_vs_training", "graph_k": 2,
                              "graph_temperature": 1.0}}
    ctx, model = _diffcl(settings)
    model.start_epoch(3)
    user_item = model.generated_adjacency["image"].to_dense()[: ctx.n_users, ctx.n_users :] > 0
    assert user_item.sum().item() == ctx.data.train.nnz + 2 * ctx.n_users
    assert user_item[torch.from_numpy(ctx.data.train.toarray() > 0)].all()


def test_generated_vs_training_views_contrast_each_modality_over_both_graphs():
    # Scored over the generated graph (DiffMM's use; the default scores over the training graph, next test).
    settings = {"alignment": False, "diffusion": {"target": "interactions", "views": "generated_vs_training",
                                                  "graph_k": 2, "score_graph": "generated"}}
    _, model = _diffcl(settings, modalities=("audio",))  # one modality: the views still have a pair
    assert model.loss(BATCH)["cl"].item() == 0.0  # before the first generation there is no second graph
    model.start_epoch(3)
    z = model.encode(model.branches, training=True)
    base = z["audio"].view
    assert base is not None and z["id"].view is None
    assert model.encode(model.branches)["audio"].view is None  # scoring never computes it
    # The second view is the branch over the training graph: what the branch is before any generation.
    generated = model.generated_adjacency.pop("audio")
    with torch.no_grad():
        torch.testing.assert_close(base.items, model.encode(model.branches)["audio"].items)
    model.generated_adjacency["audio"] = generated
    model.zero_grad()
    parts = model.loss(BATCH)
    assert parts["cl"].item() > 0
    parts["cl"].backward()
    assert model.projections["audio"][0].weight.grad.abs().sum() > 0
    # The control: as many new edges per user, drawn at random, and no denoiser to train.
    _, control = _diffcl({**settings, "diffusion": {**settings["diffusion"], "graph_source": "random"}})
    control.start_epoch(3)
    user_item = control.generated_adjacency["image"].to_dense()[: 30, 30 :] > 0
    assert user_item.sum().item() == control.train_rows.nnz + 2 * 30
    parts = control.loss(BATCH)
    assert parts["diff"].item() == 0.0 and parts["cl"].item() > 0


@pytest.mark.parametrize("score_graph", ["training", "auto"])
def test_score_graph_training_scores_over_the_training_graph_and_views_over_the_generated_one(score_graph):
    # auto, the default, is training with these views.
    settings = {"alignment": False, "diffusion": {"target": "interactions", "views": "generated_vs_training",
                                                  "graph_k": 2, "score_graph": score_graph}}
    _, model = _diffcl(settings, modalities=("audio",))
    with torch.no_grad():
        before = model.embeddings()
    model.start_epoch(3)
    with torch.no_grad():
        for after, was in zip(model.embeddings(), before, strict=True):
            torch.testing.assert_close(after, was)  # the generated graph never reaches the scores
    z = model.encode(model.branches, training=True)
    assert z["audio"].view is not None and not torch.allclose(z["audio"].view.items, z["audio"].items)
    assert model.loss(BATCH)["cl"].item() > 0
    with pytest.raises(ValueError, match="score_graph training leaves the generated graphs to the contrastive views"):
        ModelConfig(name="diffcl", diffcl={"diffusion": {"views": "cross_modal", "score_graph": "training"}})
    # With the other views auto keeps the generated graph for the scores, as those views were measured.
    cross_modal = ModelConfig(name="diffcl", diffcl={"diffusion": {"views": "cross_modal"}})
    assert not cross_modal.diffcl.diffusion.scores_over_training_graph


def test_id_view_contrasts_the_id_branch_over_the_union_of_the_generated_graphs():
    settings = {"alignment": False, "diffusion": {"target": "interactions", "views": "generated_vs_training",
                                                  "graph_k": 2, "id_view": True}}
    _, model = _diffcl(settings)
    _, without = _diffcl({**settings, "diffusion": {**settings["diffusion"], "id_view": False}})
    without.load_state_dict(model.state_dict())
    model.start_epoch(3)
    without.start_epoch(3)
    # The ID view's graph: the training edges plus every modality's generated edges.
    user_item = model.generated_adjacency["id"].to_dense()[: 30, 30 :] > 0
    expected = model.train_rows.toarray() > 0
    for m in ("image", "text"):
        expected[np.arange(30)[:, None], getattr(model, f"generated_{m}").numpy()] = True
    assert torch.equal(user_item, torch.from_numpy(expected))
    z = model.encode(model.branches, training=True)
    assert z["id"].view is not None and not torch.allclose(z["id"].view.items, z["id"].items)
    # The ID branch is still scored over the training graph: the scores do not change.
    torch.testing.assert_close(model.embeddings()[1], without.embeddings()[1])
    model.zero_grad()
    model.loss(BATCH)["cl"].backward()
    assert model.item_id.grad.abs().sum() > 0  # the ID rows now take part in the contrast
    with pytest.raises(ValueError, match="id_view needs"):
        ModelConfig(name="diffcl", diffcl={"diffusion": {"views": "generated_vs_training", "id_view": True},
                                           "id_in_score": False})


def test_model_source_generates_each_branchs_own_top_new_items():
    settings = {"alignment": False, "diffusion": {"target": "interactions", "views": "generated_vs_training",
                                                  "graph_k": 2, "graph_source": "model"}}
    _, model = _diffcl(settings)
    with torch.no_grad():
        z = model.encode(model.modalities)  # before the generation: every branch over the training graph
    model.start_epoch(3)
    seen = torch.from_numpy(model.train_rows.toarray() > 0)
    for m in ("image", "text"):
        scores = (z[m].users @ z[m].items.T).masked_fill(seen, float("-inf"))
        expected = scores.topk(2, dim=1).indices.sort(dim=1).values
        assert torch.equal(getattr(model, f"generated_{m}").sort(dim=1).values, expected)
    parts = model.loss(BATCH)
    assert parts["diff"].item() == 0.0 and parts["cl"].item() > 0  # no denoiser trains


def test_user_graph_adds_the_co_interacting_users_rows_to_every_branchs_user_rows():
    _, model = _diffcl({"user_graph_k": 3})
    _, without = _diffcl({"user_graph_k": 0})
    without.load_state_dict(model.state_dict())
    with torch.no_grad():
        z, plain = model.encode(model.branches), without.encode(without.branches)
        for b in model.branches:
            torch.testing.assert_close(z[b].items, plain[b].items)  # item rows: untouched
            torch.testing.assert_close(z[b].users, plain[b].users + model.user_graph @ plain[b].users)
    assert model.user_graph.matrix.to_dense().count_nonzero(dim=1).max() <= 3
    model.loss(BATCH)["loss"].backward()
    assert model.user_tables["image"].grad.abs().sum() > 0


def test_edge_dropout_prunes_the_training_graphs_only():
    settings = {"alignment": False, "edge_dropout": 0.5,
                "diffusion": {"target": "interactions", "views": "generated_vs_training", "graph_k": 2}}
    ctx, model = _diffcl(settings)
    _, unpruned = _diffcl({**settings, "edge_dropout": 0.0})
    unpruned.load_state_dict(model.state_dict())
    model.start_epoch(3)
    unpruned.start_epoch(3)
    train_nnz = ctx.data.train.nnz
    pruned_edges = model.graphs(training=True)[0].to_dense()[: ctx.n_users, ctx.n_users :] > 0
    assert pruned_edges.sum().item() == train_nnz // 2
    assert model.graphs(training=False)[0] is model.adjacency  # evaluation propagates over every edge
    # The generated graphs in training: the kept edges plus the same generated ones.
    for m in ("image", "text"):
        generated = model.generated_adjacency[m].to_dense()[: ctx.n_users, ctx.n_users :] > 0
        in_training = model.graphs(training=True)[1][m].to_dense()[: ctx.n_users, ctx.n_users :] > 0
        assert in_training.sum() < generated.sum() and not (in_training & ~generated).any()
    # Scores are those of the unpruned model; a training pass differs and still reaches every branch.
    torch.testing.assert_close(model.embeddings()[1], unpruned.embeddings()[1])
    z, z_full = model.encode(model.branches, training=True), unpruned.encode(unpruned.branches, training=True)
    assert not torch.allclose(z["id"].items, z_full["id"].items)
    model.loss(BATCH)["loss"].backward()
    assert model.user_tables["image"].grad.abs().sum() > 0 and model.item_id.grad.abs().sum() > 0
    # An ID branch read for its item rows only (not scored) propagates over the kept edges as well.
    guide_only = {**settings, "alignment": True, "id_in_score": False}
    _, items_only = _diffcl(guide_only)
    _, items_only_full = _diffcl({**guide_only, "edge_dropout": 0.0})
    items_only_full.load_state_dict(items_only.state_dict())
    assert items_only.id_items_only
    items_only.start_epoch(3)
    pruned_id = items_only.encode(items_only.branches, training=True)["id"].items
    assert not torch.allclose(pruned_id, items_only_full.encode(items_only_full.branches, training=True)["id"].items)


def test_modality_gates_and_the_id_block():
    _, own = _diffcl({"id_score": "own_block"})
    with torch.no_grad():
        z = own.encode(own.branches)
        users, items = own.embeddings()
    weights = torch.softmax(own.user_weight_logits, dim=1)
    expected = z["id"].users @ z["id"].items.T + sum(
        weights[:, k : k + 1] * z[m].users @ z[m].items.T for k, m in enumerate(own.modalities))
    torch.testing.assert_close(users @ items.T, expected)  # score = ID·ID + Σ_m w_m m·m
    _, gated = _diffcl({"item_gate": True, "modality_gate": "global_softmax"})
    with torch.no_grad():
        gated.item_gate_logits.fill_(-50.0)  # the item gates shut: items carry their ID rows only
        z = gated.encode(gated.branches)
        _, items = gated.embeddings()
    torch.testing.assert_close(items, z["id"].items.repeat(1, 2))
    _, attention = _diffcl({"modality_gate": "id_attention"})
    with torch.no_grad():
        w = attention.user_weights(attention.encode(attention.branches), slice(None))
    torch.testing.assert_close(w.sum(dim=1), torch.ones(30))
    assert attention.branches_in_use(training=False) == ["image", "text", "id"]
    _, dropout = _diffcl({"modality_dropout": 0.5})
    dropout.train()
    dropped = dropout.user_weights({}, slice(None))
    assert (dropped == 0).any() and set(torch.unique(dropped[dropped > 0]).tolist()) == {1.0}  # 0.5 / (1 - 0.5)
    dropout.eval()
    torch.testing.assert_close(dropout.user_weights({}, slice(None)), torch.full((30, 2), 0.5))


def test_id_gated_modality_input_is_the_id_rows_masked_by_the_features():
    _, gated = _diffcl({"modality_input": "id_gated"})
    with torch.no_grad():
        for m in gated.modalities:
            torch.testing.assert_close(gated.modality_items(m), gated.item_id * torch.sigmoid(gated.project(m)))
        gated.item_id.zero_()  # no ID rows, nothing for the features to gate: the modality items are 0
        assert all(gated.modality_items(m).abs().sum() == 0 for m in gated.modalities)
    _, gated = _diffcl({"modality_input": "id_gated", "alignment": False, "diffusion": {"enabled": False}})
    gated.loss(BATCH)["loss"].backward()
    for m in gated.modalities:  # the gates learn from the ranking loss
        assert gated.projections[m][0].weight.grad.abs().sum() > 0, m
    with pytest.raises(ValueError, match="id_gated gates the ID rows"):
        ModelConfig(diffcl={"modality_input": "id_gated", "id_branch": False})


def test_id_conditioned_denoiser_reads_the_id_rows():
    _, model = _diffcl({"diffusion": {"condition": "id", "target": "per_modality", "views": "id_anchor"}})
    denoiser = model.diffusions["image"].denoiser
    assert denoiser.cond_dim == 8 and denoiser.net[0].in_features == 8 + 10 + 8
    parts = model.loss(BATCH)
    assert torch.isfinite(parts["cl"]) and parts["diff"].item() > 0
    parts["loss"].backward()
    assert denoiser.net[0].weight.grad[:, -8:].abs().sum() > 0  # the condition's weights learn
    with pytest.raises(ValueError, match="condition id needs the ID branch"):
        ModelConfig(diffcl={"id_branch": False, "diffusion": {"condition": "id"}})


def test_view_settings_are_checked():
    with pytest.raises(ValueError, match="id_anchor needs diffusion.target per_modality"):
        ModelConfig(diffcl={"diffusion": {"target": "fused", "views": "id_anchor"}})
    with pytest.raises(ValueError, match="id_anchor needs the ID branch"):
        ModelConfig(diffcl={"id_branch": False, "diffusion": {"target": "per_modality", "views": "id_anchor"}})
    with pytest.raises(ValueError, match="cross_modal needs at least two modalities"):
        ModelConfig(diffcl={"modalities": ["image"], "diffusion": {"target": "per_modality", "views": "cross_modal"}})
    with pytest.raises(ValueError, match="interactions needs diffusion.views"):
        ModelConfig(diffcl={"diffusion": {"target": "interactions", "views": "two_samples"}})
    with pytest.raises(ValueError, match="all_pairs needs diffusion.target interactions"):
        ModelConfig(diffcl={"diffusion": {"target": "per_modality", "views": "all_pairs"}})
    with pytest.raises(ValueError, match="generated_vs_training needs diffusion.target interactions"):
        ModelConfig(diffcl={"diffusion": {"target": "fused", "views": "generated_vs_training"}})
    for mode in ("stable_id_infonce", "id_relational", "id_guided_projection"):  # a detached guide nothing else trains
        with pytest.raises(ValueError, match=f"{mode} guides with the detached ID rows"):
            ModelConfig(diffcl={"alignment_mode": mode, "id_in_score": False})
    ModelConfig(diffcl={"alignment_mode": "id_relational", "id_in_score": False,
                        "diffusion": {"target": "interactions", "views": "id_anchor"}})  # the ID-anchored views train them
    for mode in ("id_guided_projection", "degree_guided"):  # item features or degrees: no user side
        with pytest.raises(ValueError, match=f"alignment_users needs .*{mode} reads"):
            ModelConfig(diffcl={"alignment_mode": mode, "alignment_users": True})
    ModelConfig(diffcl={"alignment_mode": "id_relational", "alignment_users": True})
