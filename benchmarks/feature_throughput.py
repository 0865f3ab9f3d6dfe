"""Throughput of the feature stage against the bare encoders, and the cost of a no-op rerun.

    .venv/bin/python benchmarks/feature_throughput.py

1. text: the real Scientific item texts (../shared/data/amazon-scientific) with the packaged
   all-MiniLM-L6-v2 weights: the whole stage (read, assemble, hash, encode, write) against bare
   ``SentenceTransformer.encode`` on the same texts and batch size (models loaded beforehand);
2. image: synthetic PNGs with RANDOM-weight open_clip models (ViT-B-32, the default architecture,
   and the tiny test config, whose encoder costs almost nothing and so shows the stage's own
   ceiling): the whole stage (decode, preprocess, encode, write) against bare ``model.encode_image``
   on the same images already decoded and preprocessed into tensors;
3. a no-op rerun over 10,000 synthetic items: the stage's own seconds, and whether a model loaded.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import polars as pl
import torch
from rich.console import Console
from rich.table import Table

import features.image_encoder as image_features
import features.text_encoder as text_features
from diffcl.core.config import load_config
from features.synthetic import DemoSpec, generate
from pipeline.embed import download_images, modality_features
from pipeline.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
console = Console(width=160)


def _synthetic_config(workspace: Path, name: str, paths: dict[str, Path], image_model: str):
    return load_config({
        "workspace": str(workspace), "dataset": {"name": name, "source": "amazon2018", "reviews": str(paths["reviews"]),
                                                 "meta": str(paths["meta"])},
        "prepare": {"kcore": 1}, "features": {"image": {"model": image_model, "pretrained": None, "loader_workers": 1}},
    })


def _timed_stage(module, loader: str, loaded, config, modality: str):
    """(report, seconds) of the stage with the module's model loader swapped for the loaded model,
    so that the timing excludes model loading as the bare encoder's does."""
    original = getattr(module, loader)
    setattr(module, loader, lambda *a, **k: loaded)
    try:
        start = time.perf_counter()
        report = modality_features(config, modality, progress=False)
        return report, time.perf_counter() - start
    finally:
        setattr(module, loader, original)


def text_benchmark(workspace: Path, table: Table) -> None:
    config = load_config(ROOT / "configs" / "scientific.yaml", [f"workspace={workspace}"])
    if not Path(config.dataset.interactions).exists():
        table.add_row("text", "-", "-", "-", "Scientific data absent")
        return
    prepare(config, progress=False)
    spec = text_features.resolve_text_model(config.features.text.model, workspace / "weights.json")
    model = text_features.load_text_encoder(spec, "cpu")
    items = pl.read_parquet(workspace / "scientific" / "prepared" / "items.parquet")
    texts = text_features.assemble_texts(items, config.features.text.fields, config.features.text.max_chars)
    batch = config.features.text.batch_size
    model.encode(texts[:64], batch_size=batch)  # warm-up
    start = time.perf_counter()
    model.encode(texts, batch_size=batch)
    bare = time.perf_counter() - start
    report, whole = _timed_stage(text_features, "load_text_encoder", model, config, "text")
    n = len(texts)
    # Per embedded text: the stage embeds each distinct text once, the bare encoder all n.
    overhead = (whole / report.embedded) / (bare / n) - 1
    table.add_row("text (MiniLM, real Scientific texts)", f"{n / bare:.1f}", f"{report.embedded / whole:.1f}",
                  f"{overhead:+.1%}", f"{n} items, {report.embedded} distinct texts embedded, batch {batch}")


def image_benchmark(workspace: Path, table: Table, architecture: str, n_items: int) -> None:
    src = workspace / f"img-src-{architecture}"
    paths = generate(src, DemoSpec(users=60, items=n_items, groups=6, min_per_user=5, max_per_user=20, image_size=96))
    name = f"img-{architecture.lower()}"
    config = _synthetic_config(workspace, name, paths, architecture)
    prepare(config, progress=False)
    download_images(config, progress=False)
    sources = pl.read_parquet(workspace / name / "features" / "image_sources.parquet")
    files = sources.get_column("path").to_list()
    spec = image_features.resolve_clip(architecture, None, workspace / "weights.json")
    model, preprocess = image_features.load_clip(spec, "cpu")
    from PIL import Image

    tensors = [preprocess(Image.open(f).convert("RGB")) for f in files]
    batch = config.features.image.batch_size
    with torch.no_grad():
        model.encode_image(torch.stack(tensors[:batch]))
        start = time.perf_counter()
        for i in range(0, len(tensors), batch):
            model.encode_image(torch.stack(tensors[i : i + batch]))
        bare = time.perf_counter() - start
    report, whole = _timed_stage(image_features, "load_clip", (model, preprocess), config, "image")
    size = tensors[0].shape[-1]
    table.add_row(f"image ({architecture}, random weights, {size} px)", f"{len(files) / bare:.1f}", f"{report.embedded / whole:.1f}",
                  f"{whole / bare - 1:+.1%}", f"{len(files)} synthetic 96 px PNGs, batch {batch}, 1 loader worker")


def noop_benchmark(workspace: Path, table: Table, n_items: int = 12_000) -> None:
    src = workspace / "big-src"
    paths = generate(src, DemoSpec(users=2000, items=n_items, groups=8, min_per_user=5, max_per_user=30, image_size=16))
    config = _synthetic_config(workspace, "big", paths, "diffcl-tiny")
    prepare(config, progress=False)
    items = pl.read_parquet(workspace / "big" / "prepared" / "items.parquet").height
    download_images(config, progress=False)
    for modality in ("text", "image"):
        modality_features(config, modality, progress=False)  # the first, real run
    loads = {"n": 0}
    originals = (text_features.load_text_encoder, image_features.load_clip)

    def counting(original):
        def wrapped(*args, **kwargs):
            loads["n"] += 1
            return original(*args, **kwargs)
        return wrapped

    text_features.load_text_encoder, image_features.load_clip = (counting(f) for f in originals)
    try:
        start = time.perf_counter()
        download_images(config, progress=False)
        reports = [modality_features(config, m, progress=False) for m in ("text", "image")]
        seconds = time.perf_counter() - start
    finally:
        text_features.load_text_encoder, image_features.load_clip = originals
    statuses = ", ".join(f"{r.modality} {r.status}" for r in reports)
    table.add_row(f"no-op rerun, {items:,} items (text + images)", "-", "-", f"{seconds:.2f} s",
                  f"{statuses}; models loaded: {loads['n']}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    table = Table(title="feature stage vs bare encoders (items/s, one process, after imports and model loading)")
    for col in ("what", "bare encoder", "whole stage", "stage overhead", "notes"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        text_benchmark(Path(tmp), table)
        image_benchmark(Path(tmp), table, "ViT-B-32", 240)  # the default architecture: the target
        image_benchmark(Path(tmp), table, "diffcl-tiny", 600)  # a near-free encoder: the stage's own ceiling
        noop_benchmark(Path(tmp), table)
    console.print(table)
    console.print("Targets: text overhead < 15%, image overhead < 25%, no-op rerun of 10,000 items < 2 s with no model loaded.")


if __name__ == "__main__":
    main()
