"""Config of the model library: the graphs (``graphs``) and the models (``model``), each model's
settings and hyper-parameter search space beside it."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from diffcl.core.config.base import Choice, IntRange, LogUniform, Modality, SearchSpace, Strict

DEFAULT_MODALITY_WEIGHTS = {"image": 0.1, "text": 0.9}  # FREEDOM's fusion of MMRec's two modalities


class GraphsConfig(Strict):
    """The interaction graph and the frozen item-item graphs built from modality features."""

    knn_k: int = Field(10, ge=1, description="neighbours per item in the modality kNN graphs")
    modality_weights: dict[Modality, Annotated[float, Field(ge=0)]] = Field(
        default_factory=lambda: dict(DEFAULT_MODALITY_WEIGHTS),
        description="weight of each modality's kNN graph in the fused item graph S = Σ w_m S_m; the weights "
        "of the modalities fused are renormalised to sum 1, and one not listed here weighs 1/n "
        "(n: modalities fused) before that. Default: image 0.1, text 0.9 (FREEDOM)",
    )
    chunk_items: int = Field(
        4096, ge=1, description="rows of the item-item similarity computed at once (bounds memory)"
    )
    ann_above: int | None = Field(
        None, ge=1, description="catalogues of more items than this get an approximate kNN graph (FAISS HNSW, "
        "the 'scale' extra) instead of the exact O(items²) one; none: always exact"
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_image_weight(cls, data: Any) -> Any:
        if isinstance(data, dict) and "image_weight" in data:
            w = data["image_weight"]
            raise ValueError(f"graphs.image_weight was replaced by graphs.modality_weights (e.g. {{image: {w}, "
                             f"text: 1 - {w}}})")
        return data


SHARED_SEARCH_SPACE: SearchSpace = {
    "train.lr": LogUniform(1e-4, 1e-2),
    "model.reg_weight": LogUniform(1e-6, 1e-2),
}


class MFConfig(Strict):
    """Matrix factorisation with BPR: no settings beyond model.embedding_dim and model.reg_weight.
    ``diffcl tune`` searches only the shared keys (train.lr, model.reg_weight)."""

    search_space: ClassVar[SearchSpace] = {}


class LightGCNConfig(Strict):
    """LightGCN. ``diffcl tune`` searches the shared keys and ``search_space``: the layer count."""

    search_space: ClassVar[SearchSpace] = {"model.lightgcn.layers": IntRange(1, 4)}
    layers: int = Field(2, ge=0, description="propagation layers")
    combine: Literal["mean", "sum"] = Field("mean", description="how the layer outputs 0..L are combined")


class DiffusionSettings(Strict):
    """DiffCL's view generator (spec section 5)."""

    enabled: bool = Field(True, description="false: views are Gaussian perturbations of the same strength (w/o "
                          "diffusion); with target interactions: no generated graphs, every branch on the training graph (so the "
                          "generated_vs_training views have no pair)")
    target: Literal["fused", "per_modality", "interactions"] = Field(
        "interactions", description="what is diffused: the fused rows, each modality's rows, or (interactions, DiffMM's "
        "generator) each user's interaction row, once per modality: a denoiser conditioned on that modality's "
        "item rows generates a modality-aware user-item graph (graph_* keys), over which the modality branch "
        "propagates for its contrastive view (and, score_graph generated, for its scores); the views are then the "
        "branches' own rows. Default since issue 11: the only generator whose removal costs accuracy in the probes "
        "(docs/model.md). With the contrastive loss off and the scores over the training graph, the graphs are "
        "still generated (as the ablation w/o contrastive loss was measured) but nothing reads them"
    )
    views: Literal["two_samples", "clean_vs_diffused", "cross_modal", "id_anchor", "all_pairs",
                   "generated_vs_training"] = Field(
        "generated_vs_training", description="the two contrastive views: two diffusion samples of the same rows, "
        "clean vs diffused, one modality's view vs another's (cross_modal), each modality's view vs the clean ID "
        "rows (id_anchor), or with target interactions only: every pair of branches, ID included (all_pairs), or "
        "(the default since issue 11's last probes) each modality branch over its generated graph vs the same "
        "branch over the training graph (generated_vs_training: a pair for any number of modalities, one "
        "included). cross_modal and id_anchor need target per_modality or interactions, the first two fused or "
        "per_modality. With target interactions and one modality, cross_modal has no pair: no contrastive term (logged)"
    )
    score_graph: Literal["auto", "generated", "training"] = Field(
        "auto", description="target interactions: the graph a modality branch is scored over once generated "
        "graphs exist: the training graph, the generated one then serving only as the other contrastive view, as an "
        "augmentation does (training); or its generated graph (generated, DiffMM's use). auto: training with the "
        "generated_vs_training views (the default since session 9: level on validation, ahead on test on three "
        "Scientific splits, docs/model.md), generated with the other views (as they were measured)"
    )
    id_view: bool = Field(
        False, description="generated_vs_training views: the ID branch is contrasted too, its rows over the "
        "training graph (those it is scored with) against its rows over the training graph plus every modality's "
        "generated edges, whatever graph_mode (needs the scored ID branch)"
    )
    condition: Literal["none", "id"] = Field(
        "none", description="id: the embedding denoiser also reads the same node's ID-branch row (detached), so the "
        "generated views carry ID-guided semantics (targets fused and per_modality; needs the ID branch)"
    )
    steps: int = Field(5, ge=1, description="T, diffusion steps")
    noise_scale: float = Field(0.1, gt=0, description="s: scales the noise levels (sets the final noise level)")
    noise_min: float = Field(1e-4, gt=0, description="smallest β before scaling")
    noise_max: float = Field(0.02, gt=0, description="largest β before scaling")
    start_step: int | None = Field(None, ge=0, description="t': reverse sampling starts here; null: T")
    hidden: int = Field(256, ge=1, description="denoiser MLP width")
    time_dim: int = Field(10, ge=2, description="sinusoidal time embedding width")
    graph_k: int = Field(10, ge=1, description="target interactions: edges per user of each generated graph (top-k)")
    graph_mode: Literal["union", "replace"] = Field(
        "union", description="target interactions: a modality branch's generated graph is the training graph plus "
        "its generated edges (union), or the generated edges alone (replace)"
    )
    graph_new_only: bool = Field(
        True, description="target interactions: the top-k is taken among items the user has not interacted with "
        "in training (unseen by that user, not the cold-start protocol's new items) "
        "(the generated edges add to the training graph); false: among all items (DiffMM)"
    )
    graph_source: Literal["denoiser", "random", "model"] = Field(
        "denoiser", description="target interactions: who picks the generated edges: the denoisers; or, as "
        "controls with as many new items per user: uniformly random ones (for w/o diffusion with the graph views), "
        "or each modality branch's own current top-scored ones (model: self-training, no denoiser)"
    )
    graph_temperature: float = Field(
        0.0, ge=0, description="target interactions: 0 takes each user's top-k scored items; above 0 draws the k items "
        "without replacement from a softmax over the user's standardised scores at this temperature (Gumbel top-k): "
        "between the denoiser's own picks (0) and uniformly random ones (large)"
    )
    graph_every: int = Field(2, ge=1, description="target interactions: regenerate the graphs every this many epochs")
    graph_hidden: int = Field(256, ge=1, description="target interactions: width of the interaction denoiser")
    graph_users: int = Field(256, ge=1, description="target interactions: users whose rows train the denoiser per step")
    graph_sample_steps: int = Field(
        1, ge=1, description="target interactions: reverse steps from the clean row when generating a graph (DiffMM: T)"
    )
    graph_embed_weight: float = Field(
        0.1, ge=0, description="target interactions: weight of DiffMM's modality-aware term, the MSE between the "
        "denoised row times the modality's item rows and the true row times the ID item rows"
    )

    @property
    def scores_over_training_graph(self) -> bool:
        """score_graph with auto resolved: whether a modality branch is scored over the training graph."""
        if self.score_graph == "auto":
            return self.target == "interactions" and self.views == "generated_vs_training"
        return self.score_graph == "training"


class DiffCLConfig(Strict):
    """DiffCL as reconstructed in docs (diffcl-model.md); every [switch] of the spec is here.
    ``diffcl tune`` searches the shared keys and ``search_space``: the loss weights, τ, the
    diffusion noise scale and the layer count."""

    search_space: ClassVar[SearchSpace] = {
        "model.diffcl.cl_weight": LogUniform(1e-3, 1.0),
        "model.diffcl.align_weight": LogUniform(1e-3, 1.0),
        "model.diffcl.temperature": LogUniform(0.05, 1.0),
        "model.diffcl.diffusion.noise_scale": LogUniform(0.01, 0.5),
        "model.diffcl.layers": IntRange(1, 4),  # the range LightGCN is searched over
    }

    def setting_search_space(self) -> SearchSpace:
        """Keys searched only where the setting they belong to is on (elsewhere they change nothing)."""
        if self.new_item_id == "from_content_scaled":
            return {"model.diffcl.new_item_length": LogUniform(0.5, 10.0)}
        return {}

    modalities: list[Modality] = Field(
        ["image", "text"], description="modality branches, any names with features (e.g. [image, audio]), in this order"
    )
    projection: Literal["mlp", "linear"] = Field("mlp", description="feature projection: d_m -> 4d -> d MLP, or linear")
    modality_input: Literal["projection", "id_gated"] = Field(
        "projection", description="a modality branch's item input: its projected features x̃ᵐ (projection), or "
        "(id_gated, MGCN's behaviour-guided purifier) the item's ID row gated by them, e^id ⊙ σ(x̃ᵐ): the features "
        "choose which of the ID row's dimensions the branch keeps, so every modality branch lives in the ID space "
        "(needs the ID branch)"
    )
    max_feature_dim: int | None = Field(
        384, ge=8, description="wider raw features are reduced by PCA (once, frozen) before the projection; null: never"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="dense MLPs (projections, denoiser) under bfloat16 autocast; sparse products and "
        "losses stay float32. auto: bf16 where the hardware has it natively (AVX512-BF16/AMX CPUs, CUDA)"
    )
    layers: int = Field(2, ge=0, description="L, propagation layers of the graph encoder")
    combine: Literal["sum", "mean"] = Field(
        "mean", description="layer combination; mean (LightGCN's) where the first spec said sum: the sum "
        "scales every score ~9x and made the model peak within a few epochs (docs/model.md)"
    )
    normalize_inputs: Literal["all", "modalities", "none"] = Field(
        "modalities", description="which branches L2-normalise their input rows before propagation: all "
        "(the first spec; it bounds the ID branch's scores like a cosine without temperature), the modality "
        "branches only (the ID branch then is LightGCN's), or none"
    )
    fusion: Literal["concat", "sum"] = Field(
        "concat", description="scored representation: the modality branches concatenated (weighted per "
        "user), or summed (weighted per user) in d dimensions"
    )
    modality_gate: Literal["user_softmax", "global_softmax", "user_sigmoid", "id_attention"] = Field(
        "user_softmax", description="the user-side weights of the modality blocks: a learned softmax per user, one "
        "learned softmax for all users, an independent learned 2·sigmoid gate per user and modality (can switch "
        "every modality off), or attention with the user's ID row as query over the user's modality rows"
    )
    item_gate: bool = Field(
        False, description="the item-side modality rows of the score are scaled by a learned global 2·sigmoid gate "
        "per modality (1 at start): the score can drop a weak modality on both sides"
    )
    id_score: Literal["every_block", "own_block"] = Field(
        "every_block", description="with id_in_score: the ID rows added to every modality block (the ID-modality "
        "cross terms are in the score, the ID product counted once per modality), or the ID rows as one more "
        "block (score = ID·ID + Σ_m w_m Zᵐ_u·Zᵐ_i)"
    )
    modality_dropout: float = Field(
        0.0, ge=0, lt=1, description="training only: each user row's modality block is dropped with this "
        "probability (the kept ones scaled by 1/(1-p)), so the score cannot lean on one modality alone"
    )
    edge_dropout: float = Field(
        0.0, ge=0, lt=1, description="training only: this share of the interaction edges is pruned each epoch, "
        "degree-sensitively as FREEDOM does (its 0.8-0.9 on Amazon data); every branch and generated graph "
        "propagates over the kept edges, evaluation over all of them (with graph_mode replace the generated "
        "graphs hold no training edge, so only the training graph is pruned). 0: no pruning"
    )
    id_branch: bool = Field(True, description="false: no item-ID branch (ablation w/o ID)")
    new_item_id: Literal["zero", "from_content", "from_content_scaled"] = Field(
        "zero", description="the cold-start protocol's new items (train.negatives trained_items): ID rows at zero, "
        "or (from_content) the mean of their modalities' projected features, so that an alignment that maps "
        "content to the ID rows (alignment_mode id_guided_projection) gives a new item an ID row; "
        "from_content_scaled: the same direction at the trained ID rows' mean length (the projections' own "
        "length is trained by nothing: the modality branches normalise it, the alignment is a cosine); no "
        "effect without new items"
    )
    new_item_length: float = Field(
        1.0, gt=0, description="with new_item_id from_content_scaled: the content rows' length in units of the "
        "trained ID rows' mean length (1: a typical trained item). Nothing in training sees a new item, so how "
        "far new items climb the full ranking is a validation choice, as FREEDOM's weight decay makes it"
    )
    id_in_score: bool = Field(
        True, description="add the ID branch to every block of the scored representation (false: the first "
        "spec, where the ID branch only guides through the alignment loss)"
    )
    item_graph: bool = Field(True, description="false: no frozen item-item graph (ablation)")
    item_graph_weighting: Literal["uniform", "by_degree"] = Field(
        "uniform", description="how much of the item-item graph's term S·Z each item's rows get: uniform (all 1), or "
        "by_degree, 2m/(d+m) for an item of training degree d (m the median degree): the popular items collect less "
        "score through their content neighbours, the sparse ones up to twice as much; a long-tail switch "
        "(docs/model.md rows 130-142)"
    )
    user_graph_k: int = Field(
        0, ge=0, description="DRAGON's frozen user-user graph: every branch's user rows get the weighted mean of "
        "their k users with the most items in common added, as item rows get the item-item graph's; 0: none"
    )
    diffusion: DiffusionSettings = Field(default_factory=DiffusionSettings)
    contrastive: bool = Field(True, description="false: no contrastive loss (ablation w/o CL)")
    negatives: Literal["in_batch", "all_nodes"] = Field(
        "in_batch", description="the contrastive (InfoNCE) loss's candidates: the batch's nodes, or every node "
        "(not the ranking loss's sampled negatives: train.negatives)"
    )
    cl_nodes: int | None = Field(
        512, ge=2, description="at most this many of the batch's unique users (and items) enter the "
        "views, contrastive and alignment losses, drawn at random; null: all of them"
    )
    temperature: float = Field(0.2, gt=0, description="τ of InfoNCE")
    alignment: bool = Field(True, description="false: no alignment loss (ablation)")
    alignment_mode: Literal["distribution", "id_anchor_infonce", "stable_id_infonce", "id_relational",
                            "id_guided_projection", "degree_guided"] = Field(
        "distribution", description="spec section 7: MENTOR's distribution alignment of the ID, fused and modality "
        "item rows; InfoNCE of each modality's item rows against the ID rows; the same with the ID rows "
        "detached (the stable guide: only the modality rows move); or (id_relational) each modality's item "
        "neighbourhoods in the batch (a softmax over cosine similarities, τ) pulled towards the detached ID rows' "
        "by KL divergence, averaged over the modalities: the ID rows guide which items a modality sees as alike, "
        "not where its rows lie; or (id_guided_projection) each modality's projected features of the batch items, "
        "before propagation, against the detached ID rows by InfoNCE, averaged over the modalities; or "
        "(degree_guided) the guide chosen per item by its training degree d: the modality rows pulled towards the "
        "detached ID row with weight d / (d + median d), the ID row towards the detached modality rows with the rest"
    )
    alignment_users: bool = Field(
        False, description="the alignment also over the contrastive sample's users: each modality's user rows against "
        "the ID user rows, as alignment_mode says (the fused rows only item-side); not with id_guided_projection "
        "or degree_guided, which read the items' features or degrees"
    )
    cl_weight: float = Field(
        0.05, ge=0, description="λ_cl; 0.05 with the generated-vs-training views (above 0.01 and level with 0.2 on "
        "Scientific's validation split); with the embedding views 0.01 cost ~5% valid R@20 on TikTok and 0.001 was "
        "neutral (docs/model.md)"
    )
    align_weight: float = Field(0.1, ge=0, description="λ_align")
    diff_weight: float = Field(1.0, ge=0, description="λ_diff")

    @model_validator(mode="after")
    def _check_views(self) -> DiffCLConfig:
        views, target = self.diffusion.views, self.diffusion.target
        if views in ("cross_modal", "id_anchor") and target == "fused":
            raise ValueError(f"diffusion.views {views} needs diffusion.target per_modality or interactions")
        graph_views = ("cross_modal", "id_anchor", "all_pairs", "generated_vs_training")
        if target == "interactions" and views not in graph_views:
            raise ValueError(f"diffusion.target interactions needs diffusion.views one of {', '.join(graph_views)}")
        if views in ("all_pairs", "generated_vs_training") and target != "interactions":
            raise ValueError(f"diffusion.views {views} needs diffusion.target interactions")
        if self.diffusion.score_graph == "training" and (views != "generated_vs_training" or target != "interactions"):
            raise ValueError("diffusion.score_graph training leaves the generated graphs to the contrastive views: it "
                             "needs diffusion.target interactions and diffusion.views generated_vs_training")
        if self.diffusion.id_view and (views != "generated_vs_training" or not (self.id_branch and self.id_in_score)):
            raise ValueError("diffusion.id_view needs diffusion.views generated_vs_training and the scored ID branch "
                             "(id_branch and id_in_score true)")
        if self.diffusion.condition == "id" and (not self.id_branch or target == "interactions"):
            raise ValueError("diffusion.condition id needs the ID branch and target fused or per_modality")
        detached_guide = self.alignment and self.alignment_mode in ("stable_id_infonce", "id_relational",
                                                                          "id_guided_projection")
        if detached_guide and self.id_branch and not self.id_in_score and views not in ("id_anchor", "all_pairs"):
            raise ValueError(f"alignment_mode {self.alignment_mode} guides with the detached ID rows, and with "
                             "id_in_score false nothing else trains them: set id_in_score true or another alignment_mode")
        if self.alignment_users and self.alignment_mode in ("id_guided_projection", "degree_guided"):
            raise ValueError(f"alignment_users needs an alignment_mode over branch rows with no item data: "
                             f"{self.alignment_mode} reads the items' features or degrees, which users do not have")
        if self.item_graph_weighting != "uniform" and not self.item_graph:
            raise ValueError(f"item_graph_weighting {self.item_graph_weighting} weights the item-item graph: it needs "
                             "item_graph true")
        if self.modality_input == "id_gated" and not self.id_branch:
            raise ValueError("modality_input id_gated gates the ID rows: it needs the ID branch (id_branch: true)")
        if self.modality_gate == "id_attention" and not self.id_branch:
            raise ValueError("modality_gate id_attention needs the ID branch")
        if views == "cross_modal" and len(self.modalities) < 2 and target != "interactions":
            raise ValueError("diffusion.views cross_modal needs at least two modalities")
        if views == "id_anchor" and not self.id_branch:
            raise ValueError("diffusion.views id_anchor needs the ID branch (id_branch: true)")
        if self.diffusion.start_step is not None and self.diffusion.start_step > self.diffusion.steps:
            raise ValueError("diffusion.start_step cannot exceed diffusion.steps")
        return self


class FreedomConfig(Strict):
    """FREEDOM (Zhou & Shen, MM'23): frozen item-item graph over ID embeddings, LightGCN on a
    degree-sensitively pruned interaction graph, BPR plus projected-feature BPR.
    ``diffcl tune`` searches the shared keys and ``search_space``: the edge dropout (the paper's
    grid) and the feature-BPR weight."""

    search_space: ClassVar[SearchSpace] = {
        "model.freedom.dropout": Choice((0.5, 0.8, 0.9)),
        "model.freedom.feature_bpr_weight": LogUniform(1e-5, 1e-1),
    }

    modalities: list[Modality] = Field(
        ["image", "text"], description="modalities used, any names with features (e.g. [image, audio])"
    )
    layers: int = Field(2, ge=0, description="propagation layers on the interaction graph")
    item_layers: int = Field(1, ge=0, description="propagation layers on the item-item graph")
    dropout: float = Field(0.8, ge=0, lt=1, description="share of interaction edges pruned each epoch (degree-sensitive)")
    feature_bpr_weight: float = Field(1e-4, ge=0, description="weight of the projected-feature BPR losses")


class ModelConfig(Strict):
    """Which model to train (``name``, from the registry) and each model's own settings."""

    name: str = Field("lightgcn", description="registered model name: mf, lightgcn, freedom, diffcl")
    allow_missing_modalities: bool = Field(
        False, description="train without a modality the model reads (its modalities list) whose features "
        "are missing, with a warning; false: that is an error naming the modality"
    )
    embedding_dim: int = Field(64, ge=1, description="width of user and item embeddings")
    reg_weight: float = Field(
        1e-4, ge=0, description="L2 weight on the batch's ego embeddings (the field's standard reg)"
    )
    ranking_loss: Literal["bpr", "in_batch_softmax"] = Field(
        "bpr", description="the recommendation loss of every model: bpr (each training pair against one sampled "
        "negative, the field's standard and every model's paper) or in_batch_softmax (each pair's user against all "
        "positive and sampled items of the batch, cross-entropy at softmax_temperature)"
    )
    softmax_temperature: float = Field(
        1.0, gt=0, description="τ of in_batch_softmax: logits are u·i / τ (unused with bpr)"
    )
    softmax_logq: bool = Field(
        False, description="in_batch_softmax's sampling-bias correction (Yi et al. 2019): subtract log q_i, the "
        "chance item i is a candidate (half its share of the training interactions, since positives come by "
        "interaction, half uniform over the items train.negatives draws from, since negatives do), from every logit; without it popular items are "
        "over-penalised as negatives (unused with bpr)"
    )
    mf: MFConfig = Field(default_factory=MFConfig)
    lightgcn: LightGCNConfig = Field(default_factory=LightGCNConfig)
    freedom: FreedomConfig = Field(default_factory=FreedomConfig)
    diffcl: DiffCLConfig = Field(default_factory=DiffCLConfig)

    @field_validator("name")
    @classmethod
    def _check_known(cls, name: str) -> str:
        if name not in model_names():
            raise ValueError(f"unknown model {name!r}; known: {model_names()}")
        return name


def model_names() -> list[str]:
    """The models there are: one settings section of :class:`ModelConfig` each (the model library's
    registry has one class per name; a test keeps the two equal)."""
    return sorted(name for name, field in ModelConfig.model_fields.items()
                  if isinstance(field.annotation, type) and issubclass(field.annotation, Strict))


def search_space(model_name: str, model: ModelConfig | None = None) -> SearchSpace:
    """What ``diffcl tune`` searches for a model: the shared keys plus its config's own, and (given the
    model settings) the keys of the settings that are on."""
    field = ModelConfig.model_fields.get(model_name)
    own = getattr(field.annotation, "search_space", {}) if field is not None else {}
    settings = getattr(model, model_name, None) if model is not None else None
    by_setting = settings.setting_search_space() if hasattr(settings, "setting_search_space") else {}
    return {**SHARED_SEARCH_SPACE, **own, **by_setting}
