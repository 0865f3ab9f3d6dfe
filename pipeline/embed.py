"""``diffcl features``: the feature matrix of every modality of the prepared items.

Writes ``features/<modality>.parquet`` (see :mod:`diffcl.core.feature_files`) for each modality: a file
named in ``features.files``, a shipped MMRec ``<modality>_feat.npy``, or this package's text and image
encoders; and ``features/image_sources.parquet`` (per item: URL, ok/missing, reason, content hash).
Incremental: a rerun with nothing changed loads no model and writes nothing; new or changed items
are embedded, everything else comes from the per-item cache under ``features/cache/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from diffcl.core.config import (
    ENCODED_MODALITIES,
    ImageFeaturesConfig,
    PipelineConfig,
    TextFeaturesConfig,
)
from diffcl.core.feature_files import (
    available_features,
    check_finite,
    read_npy_matrix,
    write_features,
)
from diffcl.core.io import write_parquet_atomic
from diffcl.core.prepared import verify_prepared
from diffcl.core.workspace import DatasetDirs
from features.embedding_cache import EmbeddingCache, content_key

log = logging.getLogger(__name__)

class FeatureError(RuntimeError):
    pass


@dataclass
class ModalityReport:
    modality: str
    status: str  # written | imported | skipped
    items: int = 0
    embedded: int = 0
    reused: int = 0
    missing: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    note: str = ""

    @property
    def items_per_s(self) -> float:
        return self.embedded / self.encode_seconds if self.encode_seconds else float("nan")


def _versions(*packages: str) -> dict[str, str]:
    out = {}
    for name in ("torch", "polars", "pyarrow", *packages):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


@dataclass(frozen=True)
class FeatureInputs:
    """What every modality reads: the folders, the prepared items (checked against stats.json once),
    the shipped feature files."""

    dirs: DatasetDirs
    items: pl.DataFrame
    shipped: dict[str, str]


def read_inputs(config: PipelineConfig) -> FeatureInputs:
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    items_path = dirs.prepared / "items.parquet"
    if not items_path.exists():
        raise FeatureError(f"no prepared items in {dirs.prepared}; run `diffcl prepare` first")
    verify_prepared(dirs.prepared, (items_path.name,))
    items = pl.read_parquet(items_path).sort("item")
    dirs.features.mkdir(parents=True, exist_ok=True)
    stats = json.loads((dirs.prepared / "stats.json").read_text())
    return FeatureInputs(dirs, items, shipped_features(config, stats))


def feature_modalities(config: PipelineConfig, shipped: dict[str, str]) -> list[str]:
    """Every modality the features stage handles: the encoded ones (text, image), then the other
    names of ``features.files`` and of the shipped ``<name>_feat.npy`` files, sorted."""
    others = sorted((set(config.features.files) | set(shipped)) - set(ENCODED_MODALITIES))
    return [*ENCODED_MODALITIES, *others]


def shipped_features(config: PipelineConfig, stats: dict[str, Any]) -> dict[str, str]:
    """The shipped feature files recorded by the data stage, by modality; none when
    ``features.precomputed`` is off."""
    return stats.get("precomputed_features", {}) if config.features.precomputed else {}


def feature_source(config: PipelineConfig, modality: str, shipped: dict[str, str]) -> Path | None:
    """The file a modality is imported from: ``features.files`` first, then the shipped one."""
    named = config.features.files.get(modality) or shipped.get(modality)
    return Path(named) if named else None


def modality_features(config: PipelineConfig, modality: str, progress: bool = True,
                      inputs: FeatureInputs | None = None) -> ModalityReport:
    """One modality's feature file: imported (a configured or shipped file), encoded (text and
    image, incrementally), or skipped."""
    inputs = inputs or read_inputs(config)
    dirs, items, shipped = inputs.dirs, inputs.items, inputs.shipped
    path = dirs.features / f"{modality}.parquet"
    source = feature_source(config, modality, shipped)
    if not config.features.enabled(modality):
        path.unlink(missing_ok=True)
        report = ModalityReport(modality, "skipped", note=f"features.{modality}.enabled is false")
    elif source is not None:
        report = _import_file(modality, source, items, path)
    elif modality == "text":
        report = _run_text(config.features.text, items, dirs, progress)
    elif modality == "image":
        report = _run_image(config.features.image, items, dirs, progress)
    else:
        raise FeatureError(f"modality {modality!r}: no features.files.{modality} entry and no shipped "
                           f"{modality}_feat.npy to import it from")
    if report.status == "skipped":
        log.info("%s modality skipped: %s", modality, report.note)
    return report


def run_features(config: PipelineConfig, progress: bool = True) -> list[ModalityReport]:
    """Every modality, images downloaded first: the ``diffcl features`` command. Feature files of
    modalities no longer produced are removed, so that no later stage reads a stale one."""
    inputs = read_inputs(config)
    dirs = inputs.dirs
    download_images(config, progress, inputs)
    modalities = feature_modalities(config, inputs.shipped)
    reports = [modality_features(config, m, progress, inputs) for m in modalities]
    for name, path in available_features(dirs.features).items():
        if name not in modalities:
            log.warning("removed %s: no configured or shipped source has the %s modality any more", path, name)
            path.unlink()
    return reports


def download_images(config: PipelineConfig, progress: bool = True, inputs: FeatureInputs | None = None) -> Path | None:
    """Fetch the item images into the URL-keyed cache and write ``features/image_sources.parquet``
    (per item: URL, ok/missing, reason, content hash). None when the visual modality is off."""
    inputs = inputs or read_inputs(config)
    dirs, items, shipped = inputs.dirs, inputs.items, inputs.shipped
    ic = config.features.image
    if not ic.enabled or feature_source(config, "image", shipped) is not None:
        return None
    from features.image_download import DownloadSettings, fetch_images

    urls = items.get_column("image_url").to_list()
    path = dirs.features / "image_sources.parquet"
    settings = DownloadSettings(ic.timeout_s, ic.retries, 0.5, ic.max_bytes, ic.download_workers,
                                max_pixels=ic.max_pixels)
    previous = pl.read_parquet(path) if path.exists() else None  # read once: reuse and no-op check
    results = fetch_images(urls, dirs.root / "images", settings, progress, _previous_images(previous))
    sources = pl.DataFrame(
        [{"item": i, **asdict(r)} for i, r in enumerate(results)],
        schema={"item": pl.Int64, "url": pl.String, "status": pl.String, "reason": pl.String,
                "path": pl.String, "sha256": pl.String, "size": pl.Int64, "mtime_ns": pl.Int64},
    )
    if previous is not None and previous.equals(sources):
        return path  # unchanged: leave the file (and its hash) as it is
    write_parquet_atomic(sources, path)
    return path


def _previous_images(frame: pl.DataFrame | None) -> dict[str, Any]:
    """The earlier run's downloaded images by URL (its ``image_sources.parquet``)."""
    from features.image_download import ImageResult

    fields = ("url", "status", "reason", "path", "sha256", "size", "mtime_ns")
    if frame is None or not set(fields) <= set(frame.columns):
        return {}
    return {row["url"]: ImageResult(**{k: row[k] for k in fields})
            for row in frame.filter(pl.col("status") == "ok").iter_rows(named=True)}


# ------------------------------------------------------------------------------------------ text
def _text_encoder(tc: TextFeaturesConfig, dirs: DatasetDirs):
    from features.text_encoder import resolve_text_model

    return resolve_text_model(tc.model, dirs.features / "cache" / "weights.json")


def _text_cache(tc: TextFeaturesConfig, dirs: DatasetDirs, spec) -> EmbeddingCache:
    """The per-item text cache of an encoder: one definition for the whole-catalogue run and the shards."""
    return EmbeddingCache(dirs.features / "cache", "text", content_key(f"{spec.identity}:{tc.normalize}"))


def item_shards(n_items: int, shard_items: int | None) -> list[tuple[int, int]]:
    """[start, stop) item ranges of at most ``shard_items`` (``features.shard_items``); none: one range."""
    size = shard_items or max(n_items, 1)
    return [(start, min(start + size, n_items)) for start in range(0, n_items, size)]


SHARDED_MODALITIES = ("text", "image")  # the encoded ones; imported files need no shards


def modality_shards(config: PipelineConfig, modality: str) -> list[tuple[int, int]]:
    """The item ranges of a modality's shards; none when it is not encoded here (off or imported),
    or, for images, when the images stage has not run (or found no image to download)."""
    inputs = read_inputs(config)
    settings = getattr(config.features, modality)
    if not settings.enabled or feature_source(config, modality, inputs.shipped) is not None:
        return []
    if modality == "image" and not (inputs.dirs.features / "image_sources.parquet").exists():
        return []
    return item_shards(inputs.items.height, config.features.shard_items)


def encode_shard(config: PipelineConfig, modality: str, start: int, stop: int) -> int:
    """Encode what the cache lacks of items [start, stop) into a part next to the modality's cache,
    merged (deterministically) by its features run. Independent of every other shard, so any worker
    that reaches the workspace can run it. Returns the number of texts or images encoded."""
    if modality == "text":
        return _encode_text_shard(config, start, stop)
    if modality == "image":
        return _encode_image_shard(config, start, stop)
    raise ValueError(f"modality {modality!r} is not encoded here: only {', '.join(SHARDED_MODALITIES)} have shards")


def _encode_text_shard(config: PipelineConfig, start: int, stop: int) -> int:
    from features.embedding_cache import write_part
    from features.text_encoder import assemble_texts, encode_texts, load_text_encoder

    tc = config.features.text
    inputs = read_inputs(config)
    dirs, items = inputs.dirs, inputs.items
    texts = assemble_texts(items.slice(start, stop - start), tc.fields, tc.max_chars)
    spec = _text_encoder(tc, dirs)
    cache = _text_cache(tc, dirs, spec)
    by_key = {content_key(t): t for t in texts}
    todo = cache.missing(list(by_key))
    if todo:
        model = load_text_encoder(spec, tc.device)
        write_part(cache, f"{start:012d}-{stop:012d}", todo,
                   encode_texts(model, [by_key[k] for k in todo], tc.batch_size, tc.normalize, progress=False))
    return len(todo)


def _run_text(tc: TextFeaturesConfig, items: pl.DataFrame, dirs: DatasetDirs, progress: bool) -> ModalityReport:
    from features.text_encoder import assemble_texts, encode_texts, load_text_encoder

    start = time.perf_counter()
    out = dirs.features / "text.parquet"
    texts = assemble_texts(items, tc.fields, tc.max_chars)
    if not any(texts):
        out.unlink(missing_ok=True)
        return ModalityReport("text", "skipped", note="no item has text")
    spec = _text_encoder(tc, dirs)
    keys = [content_key(t) for t in texts]
    recipe = {"fields": tc.fields, "max_chars": tc.max_chars, "fallback": "prepared text", "separator": ". "}
    report = ModalityReport("text", "written", items=len(texts), missing=sum(1 for t in texts if not t))
    cache = _text_cache(tc, dirs, spec)
    sharded = cache.merge_parts()  # vectors the shards (encode_shard) encoded, if they ran
    todo = cache.missing(keys)
    encode_seconds = 0.0
    if todo:
        model = load_text_encoder(spec, tc.device)
        by_key = dict(zip(keys, texts, strict=True))
        t0 = time.perf_counter()
        cache.add(todo, encode_texts(model, [by_key[k] for k in todo], tc.batch_size, tc.normalize, progress))
        encode_seconds = time.perf_counter() - t0
    matrix = cache.lookup(keys)
    write_features(out, matrix, {
        "modality": "text", "encoder": spec.reference, "encoder_source": spec.source,
        "weights_sha256": spec.weights_sha256, "recipe": recipe, "normalized": tc.normalize,
        "items_without_text": report.missing, "versions": _versions("sentence-transformers", "transformers"),
    })
    report.embedded = len(todo) + sharded
    report.reused = len(texts) - report.embedded
    report.encode_seconds, report.seconds = encode_seconds, time.perf_counter() - start
    return report


# ----------------------------------------------------------------------------------------- image
def _run_image(ic: ImageFeaturesConfig, items: pl.DataFrame, dirs: DatasetDirs, progress: bool) -> ModalityReport:
    from features.image_download import ImageResult
    from features.image_encoder import UNTRAINED_NOTE

    start = time.perf_counter()
    out = dirs.features / "image.parquet"
    if not any(items.get_column("image_url").to_list()):
        out.unlink(missing_ok=True)
        return ModalityReport("image", "skipped", note="no item has an image URL")
    sources_path = dirs.features / "image_sources.parquet"
    sources = pl.read_parquet(sources_path).sort("item") if sources_path.exists() else None
    if sources is None or sources.height != items.height:
        raise FeatureError(f"{sources_path} is missing or stale; the images stage must run first")
    results = [ImageResult(**{k: row[k] for k in ("url", "status", "reason", "path", "sha256")})
               for row in sources.iter_rows(named=True)]
    present = np.array([r.status == "ok" for r in results])
    n_missing = int((~present).sum())
    share = n_missing / len(results)
    reasons = sources.filter(pl.col("status") == "missing").group_by("reason").len().sort("len", descending=True)
    if n_missing:
        log.warning("images missing for %d of %d items (%.1f%%): %s", n_missing, len(results), 100 * share,
                    ", ".join(f"{r} ({n})" for r, n in reasons.head(4).iter_rows()))
    if share > ic.max_missing_share:
        raise FeatureError(
            f"{n_missing} of {len(results)} items ({share:.1%}) have no usable image, more than "
            f"features.image.max_missing_share {ic.max_missing_share:.0%}; see {dirs.features / 'image_sources.parquet'}, "
            "or set features.image.enabled: false to run without the visual modality"
        )

    spec, cache = _image_cache(ic, dirs)
    keys = [r.sha256 for r in results]
    report = ModalityReport("image", "written", items=len(results), missing=n_missing,
                            note=UNTRAINED_NOTE if spec.untrained else "")
    present_keys = [k for k in keys if k is not None]
    sharded = cache.merge_parts()  # vectors the shards (encode_shard) encoded, if they ran
    todo = cache.missing(present_keys)
    encode_seconds = 0.0
    if todo:
        path_of = {r.sha256: r.path for r in results if r.sha256}
        t0 = time.perf_counter()
        cache.add(todo, _encode_image_files(ic, spec, [path_of[k] for k in todo], progress))
        encode_seconds = time.perf_counter() - t0
    vectors = cache.lookup(present_keys)
    matrix = np.zeros((len(results), vectors.shape[1]), dtype=np.float32)
    matrix[present] = vectors
    if ic.missing == "mean" and n_missing:
        matrix[~present] = vectors.mean(axis=0)
    write_features(out, matrix, {
        "modality": "image", "encoder": spec.architecture, "pretrained": spec.pretrained,
        "weights_sha256": spec.weights_sha256, "untrained": spec.untrained,
        "note": UNTRAINED_NOTE if spec.untrained else "", "missing_policy": ic.missing,
        "missing": n_missing, "missing_reasons": dict(reasons.iter_rows()), "versions": _versions("open-clip-torch"),
    }, extra_columns={"present": present} if ic.missing == "zeros" else None)
    report.embedded = len(todo) + sharded
    report.reused = len(present_keys) - report.embedded
    report.encode_seconds, report.seconds = encode_seconds, time.perf_counter() - start
    return report


def _image_cache(ic: ImageFeaturesConfig, dirs: DatasetDirs):
    """(CLIP spec, per-image cache): one definition for the whole-catalogue run and the shards."""
    from features.image_encoder import resolve_clip

    spec = resolve_clip(ic.model, ic.pretrained, dirs.features / "cache" / "weights.json")
    return spec, EmbeddingCache(dirs.features / "cache", "image", spec.identity)


def _encode_image_files(ic: ImageFeaturesConfig, spec, paths: list[str], progress: bool) -> np.ndarray:
    from diffcl.core.device import resolve_device
    from features.image_encoder import encode_images, load_clip

    device = str(resolve_device(ic.device))
    model, preprocess = load_clip(spec, device)
    return encode_images(model, preprocess, paths, ic.batch_size, ic.loader_workers, device, progress,
                         max_pixels=ic.max_pixels)


def _downloaded_images(sources: Path, start: int, stop: int | None) -> dict[str, str]:
    """Content hash -> cached file of the downloaded images of items [start, stop) (stop None: all)."""
    rows = pl.read_parquet(sources).sort("item").slice(start, None if stop is None else stop - start)
    return {row["sha256"]: row["path"] for row in rows.iter_rows(named=True) if row["status"] == "ok"}


def _uncached_images(config: PipelineConfig, start: int, stop: int | None):
    """(CLIP spec, image cache, content hash -> file) for the downloaded images of items [start,
    stop) whose vectors neither the cache nor a shard's unmerged part holds."""
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    spec, cache = _image_cache(config.features.image, dirs)
    sources = dirs.features / "image_sources.parquet"
    if not sources.exists():
        return spec, cache, {}
    path_of = _downloaded_images(sources, start, stop)
    in_parts = cache.part_keys()
    return spec, cache, {k: path_of[k] for k in cache.missing(list(path_of)) if k not in in_parts}


def images_to_encode(config: PipelineConfig, start: int = 0, stop: int | None = None) -> list[str]:
    """The image files that encoding items [start, stop) reads (what a worker elsewhere must bring
    down first)."""
    return sorted(set(_uncached_images(config, start, stop)[2].values()))


def _encode_image_shard(config: PipelineConfig, start: int, stop: int) -> int:
    """The downloaded images of items [start, stop) (``features/image_sources.parquet``, by item)."""
    from features.embedding_cache import write_part

    spec, cache, todo = _uncached_images(config, start, stop)
    if todo:
        write_part(cache, f"{start:012d}-{stop:012d}", list(todo),
                   _encode_image_files(config.features.image, spec, list(todo.values()), progress=False))
    return len(todo)


# ----------------------------------------------------------------------------------- precomputed
def _import_file(modality: str, source: Path, items: pl.DataFrame, out: Path) -> ModalityReport:
    """A feature file reordered into our item ids: ``.npy`` by MMRec itemID (row = itemID, the
    items' source_row), Parquet by the items' original ids (columns item_id, embedding)."""
    start = time.perf_counter()
    if not source.is_file():
        raise FeatureError(f"{modality} features: file not found: {source}")
    parquet = source.suffix.lower() == ".parquet"
    report = ModalityReport(modality, "imported", items=items.height, note=f"imported: {source.name}")
    imported, file_rows = (_rows_by_item_id if parquet else _rows_by_itemid)(source, items)
    check_finite(imported, str(source), file_rows=file_rows)
    write_features(out, imported, {
        "modality": modality, "encoder": f"precomputed ({source})", "untrained": False,
        "versions": _versions(),
    })
    report.seconds = time.perf_counter() - start
    return report


def _rows_by_itemid(source: Path, items: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(items x d, file rows): the rows of a ``.npy`` matrix at the items' MMRec itemIDs."""
    rows = items.get_column("source_row")
    if rows.is_null().any():
        raise FeatureError(f"{source}: a .npy matrix is read by MMRec itemID (row = itemID), which this dataset "
                           "does not have; give a Parquet file with item_id and embedding columns")
    rows = rows.to_numpy()
    matrix = read_npy_matrix(source)
    if rows.max() >= matrix.shape[0]:
        raise FeatureError(f"{source}: {matrix.shape[0]} rows, but items refer to row {rows.max()}")
    return np.asarray(matrix[rows], dtype=np.float32), rows


def _rows_by_item_id(source: Path, items: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(items x d, file rows): the rows of a Parquet file (item_id, embedding) of the items' original ids."""
    try:
        table = pl.read_parquet(source, columns=["item_id", "embedding"])
    except (pl.exceptions.PolarsError, OSError) as err:
        raise FeatureError(f"{source}: needs columns item_id and embedding (a list of floats) ({err})") from None
    table = table.with_columns(pl.col("item_id").cast(pl.String)).with_row_index("_row")
    if table.get_column("item_id").is_duplicated().any():
        raise FeatureError(f"{source}: item_id {table.filter(pl.col('item_id').is_duplicated())['item_id'][0]!r} "
                           "has more than one row")
    joined = items.select("item", "item_id").join(table, on="item_id", how="left").sort("item")
    missing = joined.filter(pl.col("_row").is_null())
    if missing.height:
        raise FeatureError(f"{source}: no row for {missing.height} of {items.height} item(s) "
                           f"(e.g. item_id {missing['item_id'][0]!r})")
    try:
        matrix = np.asarray(joined.get_column("embedding").to_list(), dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise FeatureError(f"{source}: embedding must be a list of numbers of one length per row ({err})") from None
    if matrix.ndim != 2:
        raise FeatureError(f"{source}: embedding must be a list of numbers of one length per row")
    return matrix, joined.get_column("_row").to_numpy()
