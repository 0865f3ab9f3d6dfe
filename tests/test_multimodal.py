"""DiffCL and FREEDOM: losses, the diffusion schedule, switches, and short end-to-end trains."""

import numpy as np
import pytest
import torch

from diffcl.models.contrastive import (
    distribution_alignment,
    info_nce,
    info_nce_against,
    relational_alignment,
    weighted_info_nce,
)
from diffcl.models.diffcl import Fused
from diffcl.models.diffusion import Diffusion, GaussianSchedule
from diffcl.training.run import build_run

FAST = ["train.epochs=12", "train.batch_size=512", "train.lr=0.01", "train.patience=4", "train.threads=2"]


# ------------------------------------------------------------------------------ diffusion schedule
def test_forward_noise_levels_match_closed_form():
    s = GaussianSchedule(steps=5, noise_scale=0.1, noise_min=1e-4, noise_max=0.02)
    expected = np.linspace(0.1 * 1e-4, 0.1 * 0.02, 5)
    np.testing.assert_allclose(1 - s.alpha_bar.double().numpy(), expected, atol=1e-7)  # float32 buffers
    # ᾱ is the running product of (1 - β): the betas are consistent with the levels.
    np.testing.assert_allclose(np.cumprod(1 - s.betas.double().numpy()), s.alpha_bar.numpy(), rtol=1e-6)
    # q_sample: mean sqrt(ᾱ) x0, standard deviation sqrt(1 - ᾱ).
    x0 = torch.full((200_000, 1), 2.0)
    t = torch.full((200_000,), 4)
    xt = s.q_sample(x0, t)
    assert xt.mean().item() == pytest.approx(2.0 * np.sqrt(1 - expected[4]), abs=1e-3)
    assert xt.std().item() == pytest.approx(np.sqrt(expected[4]), rel=0.02)


def test_final_noise_level_is_set_by_scale_not_steps():
    a = GaussianSchedule(steps=5, noise_scale=0.1)
    b = GaussianSchedule(steps=50, noise_scale=0.1)
    c = GaussianSchedule(steps=5, noise_scale=0.5)
    assert a.alpha_bar[-1].item() == pytest.approx(b.alpha_bar[-1].item())
    assert c.alpha_bar[-1].item() < a.alpha_bar[-1].item()


def test_reverse_step_is_the_ddpm_posterior_mean():
    s = GaussianSchedule(steps=4, noise_scale=1.0, noise_min=0.01, noise_max=0.2)
    betas = s.betas.double()
    abar = torch.cumprod(1 - betas, 0)
    x0, xt = torch.randn(3, 2), torch.randn(3, 2)
    for t in range(4):
        abar_prev = abar[t - 1] if t > 0 else torch.tensor(1.0, dtype=torch.float64)
        c0 = (abar_prev.sqrt() * betas[t] / (1 - abar[t])).item()
        ct = ((1 - betas[t]).sqrt() * (1 - abar_prev) / (1 - abar[t])).item()
        got = s.posterior_mean(x0, xt, torch.full((3,), t))
        np.testing.assert_allclose(got.numpy(), (c0 * x0 + ct * xt).numpy(), rtol=1e-5, atol=1e-6)


def test_perfect_denoiser_recovers_x0_and_views_carry_gradient():
    d = Diffusion(dim=4, steps=5, noise_scale=0.1, noise_min=1e-4, noise_max=0.02, hidden=8, time_dim=10)
    x0 = torch.randn(6, 4, requires_grad=True)
    d.denoiser.forward = lambda x_t, t, cond=None: x0.detach()  # an oracle: predicts x0 exactly
    view = d.generate(x0, 5)
    np.testing.assert_allclose(view.detach().numpy(), x0.detach().numpy(), atol=1e-5)
    d2 = Diffusion(dim=4, steps=5, noise_scale=0.1, noise_min=1e-4, noise_max=0.02, hidden=8, time_dim=10)
    d2.generate(x0, 5).sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert all(p.grad is None for p in d2.denoiser.parameters())  # trained by its own loss only
    loss = d2.row_losses(x0).mean()
    assert loss.item() >= 0
    loss.backward()
    assert all(p.grad is not None for p in d2.denoiser.parameters())


# ------------------------------------------------------------------------------------- losses
def test_info_nce_invariants():
    torch.manual_seed(0)  # unseeded, two random rows came close about once in many runs and the bound failed
    x = torch.randn(16, 8)
    n = 16
    assert info_nce(x, x, 0.05).item() < 0.1  # identical views: positives found
    same = torch.ones(n, 8)
    assert info_nce(same, same, 0.2).item() == pytest.approx(np.log(n), rel=1e-5)  # indistinguishable
    index = torch.tensor([3, 7])
    assert info_nce_against(x[index], x, index, 0.05).item() < 0.1  # all rows as candidates
    assert info_nce(torch.randn(5, 8), torch.randn(5, 8), 0.2).item() > 0
    y = torch.randn(16, 8)
    assert weighted_info_nce(x, y, 0.2, torch.ones(n)).item() == pytest.approx(info_nce(x, y, 0.2).item(), rel=1e-6)
    assert weighted_info_nce(x, y, 0.2, torch.zeros(n)).item() == 0.0


def test_distribution_alignment_invariants():
    a = torch.randn(100, 8)
    assert distribution_alignment({"a": a, "b": a.clone()}).item() == pytest.approx(0.0, abs=1e-6)
    shifted = distribution_alignment({"a": a, "b": a + 1.0})
    assert shifted.item() == pytest.approx(1.0, rel=1e-4)
    three = distribution_alignment({"a": a, "b": a * 2, "c": a})
    assert three.item() > 0


def test_relational_alignment_matches_neighbourhoods_not_rows():
    torch.manual_seed(0)
    guide = torch.randn(32, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    # Rotated and scaled rows have the guide's cosine neighbourhoods: nothing to align.
    assert relational_alignment(guide, 3.0 * guide @ rotation, 0.2).item() == pytest.approx(0.0, abs=1e-5)
    student = torch.randn(32, 8, requires_grad=True)
    loss = relational_alignment(guide.requires_grad_(), student, 0.2)
    assert loss.item() > 0
    loss.backward()
    assert student.grad.abs().sum() > 0 and guide.grad is None  # the ID guide is not pulled
    assert relational_alignment(guide[:2], student[:2], 0.2).item() == 0.0  # too few rows for a neighbourhood


# ----------------------------------------------------------------------------- model switches
def _model(demo_multimodal, *overrides, seed=0):
    torch.manual_seed(seed)
    trainer = build_run(demo_multimodal(*FAST, "model.name=diffcl", *overrides))
    return trainer


def _batch(trainer):
    from diffcl.models import Batch

    users, pos, neg = next(iter(trainer.sampler.epoch()))
    return Batch(users, pos, neg)


def test_loss_parts_shapes_and_gradient_reaches_encoder(demo_multimodal):
    trainer = _model(demo_multimodal)
    model = trainer.model
    assert model.branches == ["image", "text", "id"]
    # The default views contrast each modality over its generated graph with itself over the training
    # graph: there is a pair once the first graphs are generated.
    assert model.loss(_batch(trainer))["cl"].item() == 0.0
    model.start_epoch(3)
    parts = model.loss(_batch(trainer))
    assert {"loss", "bpr", "reg", "cl", "diff", "align"} <= set(parts)
    assert all(v.dim() == 0 and torch.isfinite(v) for v in parts.values())
    assert parts["cl"].item() > 0 and parts["diff"].item() >= 0 and parts["align"].item() >= 0
    model.zero_grad()
    parts["cl"].backward()  # the contrastive loss alone
    for name in ("projections.image.0.weight", "projections.text.0.weight", "user_tables.image"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert model.item_id.grad is None  # the default views contrast the modality branches only
    fused_views = _model(demo_multimodal, "model.diffcl.diffusion.target=fused", "model.diffcl.diffusion.views=two_samples").model
    fused_views.loss(_batch(trainer))["cl"].backward()
    assert fused_views.item_id.grad.abs().sum() > 0  # the ID branch is in the score, so in the fused views
    guide_only = _model(demo_multimodal, "model.diffcl.id_in_score=false").model
    guide_only.start_epoch(3)
    guide_only.loss(_batch(trainer))["cl"].backward()
    assert guide_only.item_id.grad is None  # scored without it, the ID branch guides through alignment only
    guide_only.zero_grad()
    guide_only.loss(_batch(trainer))["align"].backward()
    assert guide_only.item_id.grad is not None and guide_only.item_id.grad.abs().sum() > 0
    users, items = model.embeddings()
    assert users.shape == (trainer.evaluator.data.n_users, 128) and items.shape == (trainer.evaluator.data.n_items, 128)


def test_switches_change_what_they_name(demo_multimodal):
    base = _model(demo_multimodal)
    batch = _batch(base)
    u0, i0 = base.model.embeddings()

    no_cl = _model(demo_multimodal, "model.diffcl.contrastive=false").model
    parts = no_cl.loss(batch)
    assert "cl" not in parts and "align" in parts
    assert "diff" in parts  # the graph generator trains whether or not the contrastive loss is on
    torch.testing.assert_close(no_cl.embeddings()[0], u0)  # same encoder, same scores

    no_align = _model(demo_multimodal, "model.diffcl.alignment=false").model
    assert "align" not in no_align.loss(batch)

    no_graph = _model(demo_multimodal, "model.diffcl.item_graph=false").model
    assert base.model.item_graph is not None and no_graph.item_graph is None
    torch.testing.assert_close(no_graph.embeddings()[0], u0)  # users untouched by the item graph
    assert not torch.allclose(no_graph.embeddings()[1], i0)

    # by_degree: an item's share of its content neighbours falls with its training degree, and the
    # median item keeps the uniform share, 1; the users are untouched, as without the graph.
    weighted = _model(demo_multimodal, "model.diffcl.item_graph_weighting=by_degree")
    share = weighted.model.item_graph_share.squeeze(1)
    degree = torch.as_tensor(np.asarray(weighted.evaluator.data.train.sum(axis=0)).ravel(), dtype=torch.float32)
    median = degree.median()
    torch.testing.assert_close(share, 2 * median / (degree + median))
    assert float(share[degree == median][0]) == pytest.approx(1.0) and bool((share < 1).any() & (share > 1).any())
    assert "item graph by degree" in weighted.model.describe()
    torch.testing.assert_close(weighted.model.embeddings()[0], u0)
    assert not torch.allclose(weighted.model.embeddings()[1], i0)

    id_guides = _model(demo_multimodal, "model.diffcl.id_in_score=false").model
    assert not torch.allclose(id_guides.embeddings()[0], u0)

    for mode in ("all", "none"):
        other = _model(demo_multimodal, f"model.diffcl.normalize_inputs={mode}").model
        assert not torch.allclose(other.embeddings()[1], i0), mode
    layer_sum = _model(demo_multimodal, "model.diffcl.combine=sum").model
    assert not torch.allclose(layer_sum.embeddings()[1], i0)

    no_id = _model(demo_multimodal, "model.diffcl.id_branch=false").model
    assert no_id.branches == ["image", "text"] and not hasattr(no_id, "item_id")

    text_only = _model(demo_multimodal, "model.diffcl.modalities=[text]").model
    assert text_only.branches == ["text", "id"] and text_only.embeddings()[1].shape[1] == 64

    id_only = _model(demo_multimodal, "model.diffcl.modalities=[]").model
    assert id_only.branches == ["id"] and "ID branch alone" in id_only.describe()

    linear = _model(demo_multimodal, "model.diffcl.projection=linear").model
    assert isinstance(linear.projections["text"], torch.nn.Linear)

    gaussian = _model(demo_multimodal, "model.diffcl.diffusion.enabled=false").model
    parts = gaussian.loss(batch)
    assert "cl" in parts and parts["diff"].item() == 0.0

    per_mod = _model(demo_multimodal, "model.diffcl.diffusion.target=per_modality",
                     "model.diffcl.diffusion.views=cross_modal").model
    assert set(per_mod.diffusions) == {"image", "text"}
    assert torch.isfinite(per_mod.loss(batch)["cl"])

    all_nodes = _model(demo_multimodal, "model.diffcl.negatives=all_nodes").model
    assert torch.isfinite(all_nodes.loss(batch)["cl"])

    anchor = _model(demo_multimodal, "model.diffcl.alignment_mode=id_anchor_infonce").model
    assert anchor.loss(batch)["align"].item() > 0
    # The stable guide: the alignment moves the modality rows, never the ID rows.
    stable = _model(demo_multimodal, "model.diffcl.alignment_mode=stable_id_infonce").model
    align = stable.loss(batch)["align"]
    align.backward()
    assert align.item() > 0 and stable.item_id.grad is None
    assert stable.projections["image"][0].weight.grad.abs().sum() > 0
    # The relational guide likewise: the modality rows move towards the ID rows' neighbourhoods.
    relational = _model(demo_multimodal, "model.diffcl.alignment_mode=id_relational").model
    align = relational.loss(batch)["align"]
    align.backward()
    assert align.item() > 0 and relational.item_id.grad is None
    assert relational.projections["text"][0].weight.grad.abs().sum() > 0
    # The projection guide: only the feature projections move, before any propagation (no user table).
    projected = _model(demo_multimodal, "model.diffcl.alignment_mode=id_guided_projection").model
    z = projected.encode(projected.branches, training=True)
    align = projected.alignment(z, Fused(z["id"].users, z["id"].items, torch.arange(8)), torch.arange(8), torch.arange(8))
    align.backward()
    assert align.item() > 0 and projected.item_id.grad is None
    assert all(projected.projections[m][0].weight.grad.abs().sum() > 0 for m in ("image", "text"))
    assert all(projected.user_tables[b].grad is None for b in projected.branches)

    # With alignment_users the user rows are aligned too: the same model (same seed) gets one more
    # non-negative InfoNCE term per modality, and the detached ID rows still get no gradient.
    losses = {}
    for users_too in (False, True):
        guided = _model(demo_multimodal, "model.diffcl.alignment_mode=stable_id_infonce",
                        f"model.diffcl.alignment_users={str(users_too).lower()}").model
        z = guided.encode(guided.branches, training=True)
        align = guided.alignment(z, Fused(z["id"].users, z["id"].items, torch.arange(8)), torch.arange(8), torch.arange(8))
        align.backward()
        losses[users_too] = align.item()
        assert guided.user_tables["id"].grad is None and guided.item_id.grad is None
    assert losses[True] > losses[False] > 0
    # degree_guided: each side guides by item degree, so both the ID rows and the projections move.
    trainer = _model(demo_multimodal, "model.diffcl.alignment_mode=degree_guided")
    by_degree, stability = trainer.model, trainer.model.item_stability
    assert float(stability.min()) >= 0 and float(stability.max()) < 1
    degree = torch.as_tensor(np.asarray(trainer.evaluator.data.train.sum(axis=0)).ravel())
    assert bool((stability[degree.argsort()].diff() >= 0).all())  # more interactions, more trusted
    align = by_degree.loss(batch)["align"]
    align.backward()
    assert align.item() > 0 and by_degree.item_id.grad.abs().sum() > 0
    assert all(by_degree.projections[m][0].weight.grad.abs().sum() > 0 for m in ("image", "text"))


def test_id_branch_is_computed_only_where_something_reads_it(demo_multimodal):
    guide_only = ["model.diffcl.id_in_score=false"]
    model = _model(demo_multimodal, *guide_only).model
    assert model.branches_in_use(training=True) == ["image", "text", "id"]  # the alignment loss reads it
    assert model.branches_in_use(training=False) == ["image", "text"]  # the score does not
    no_align = _model(demo_multimodal, *guide_only, "model.diffcl.alignment=false").model
    assert no_align.branches_in_use(training=True) == ["image", "text"]
    in_score = _model(demo_multimodal).model
    assert in_score.branches_in_use(training=False) == ["image", "text", "id"]


def test_precision_switch_bf16_close_to_fp32(demo_multimodal):
    from diffcl.core.device import dense_dtype, native_bf16

    cpu = torch.device("cpu")
    assert dense_dtype("fp32", cpu) is None and dense_dtype("bf16", cpu) is torch.bfloat16
    assert dense_dtype("auto", cpu) is (torch.bfloat16 if native_bf16(cpu) else None)
    fp32 = _model(demo_multimodal, "model.diffcl.precision=fp32").model
    bf16 = _model(demo_multimodal, "model.diffcl.precision=bf16").model
    assert "fp32" in fp32.describe() and "bf16" in bf16.describe()
    bf16.load_state_dict(fp32.state_dict())
    with torch.no_grad():
        a, b = fp32.project("text"), bf16.project("text")
    assert b.dtype == torch.float32  # mixed precision inside, float32 out
    assert (a - b).norm() / a.norm() < 0.02
    d = Diffusion(dim=8, steps=5, noise_scale=0.1, noise_min=1e-4, noise_max=0.02, hidden=16, time_dim=10,
                  dtype=torch.bfloat16)
    x0 = torch.randn(6, 8, requires_grad=True)
    view = d.generate(x0, 5)
    view.sum().backward()
    assert view.dtype == torch.float32 and x0.grad is not None and torch.isfinite(x0.grad).all()
    losses = d.row_losses(x0)
    assert losses.shape == (6,) and losses.dtype == torch.float32


def test_cross_modal_needs_two_modalities(demo_multimodal):
    from diffcl.core.config import ConfigError

    with pytest.raises(ConfigError, match="cross_modal needs"):
        demo_multimodal("model.diffcl.diffusion.target=per_modality", "model.diffcl.diffusion.views=cross_modal",
                        "model.diffcl.modalities=[text]")
    with pytest.raises(ConfigError, match="item_graph_weighting by_degree weights the item-item graph"):
        demo_multimodal("model.diffcl.item_graph_weighting=by_degree", "model.diffcl.item_graph=false")


def random_recall(trainer, seeds=5):
    values = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(seed)
        values.append(trainer.evaluator.evaluate(torch.randn(trainer.evaluator.data.n_users, 16, generator=g),
                                                 torch.randn(trainer.evaluator.data.n_items, 16, generator=g), "test")["recall@20"])
    return float(np.mean(values))


ABLATIONS = {
    "full": [],
    "no_diffusion": ["model.diffcl.diffusion.enabled=false"],
    "no_cl": ["model.diffcl.contrastive=false"],
    "no_align": ["model.diffcl.alignment=false"],
    "no_item_graph": ["model.diffcl.item_graph=false"],
    "no_id": ["model.diffcl.id_branch=false"],
    "text_only": ["model.diffcl.modalities=[text]"],
    "visual_only": ["model.diffcl.modalities=[image]"],
    "id_only": ["model.diffcl.modalities=[]"],
}


@pytest.mark.parametrize("variant", list(ABLATIONS))
def test_each_ablation_trains_and_beats_random(demo_multimodal, variant):
    trainer = build_run(demo_multimodal(*FAST, "model.name=diffcl", *ABLATIONS[variant]), run_id=f"ablation-{variant}")
    result = trainer.fit()
    assert result.metrics["test"]["recall@20"] > 2.0 * random_recall(trainer)


def test_freedom_trains_and_uses_features(demo_multimodal):
    trainer = build_run(demo_multimodal(*FAST, "model.name=freedom"), run_id="freedom")
    assert trainer.model.modalities == ["image", "text"] and trainer.model.item_graph is not None
    result = trainer.fit()
    assert result.metrics["test"]["recall@20"] > 2.0 * random_recall(trainer)
    assert "bpr_image" in result.history.columns and "bpr_text" in result.history.columns


def test_cpu_training_with_two_threads_is_bit_reproducible(demo_multimodal):
    """Two runs of the same config give the same weights bit for bit on CPU, also with two threads
    (torch's default kernels for the backward of indexing accumulate in thread order)."""
    weights = []
    for _ in range(2):
        trainer = build_run(demo_multimodal("model.name=diffcl", "train.epochs=3", "train.threads=2",
                                            "train.device=cpu", "train.patience=10"), evaluate_test=False)
        trainer.fit()
        weights.append(torch.cat([p.detach().flatten() for p in trainer.model.parameters()]))
    assert torch.equal(weights[0], weights[1])
