"""DiffCL and FREEDOM against the baselines; prints the tables of the multimodal issue.

    .venv/bin/python benchmarks/multimodal.py --part accuracy --dataset tiktok      # real visual + acoustic, 3 seeds
    .venv/bin/python benchmarks/multimodal.py --part accuracy --dataset scientific  # real MiniLM text, 3 seeds
    .venv/bin/python benchmarks/multimodal.py --part ablations --dataset tiktok     # spec section 10, 3 seeds
    .venv/bin/python benchmarks/multimodal.py --part timing     # Baby, stand-in 4096/384-d features
    .venv/bin/python benchmarks/multimodal.py --part demo       # synthetic demo data with planted structure

``--overlay MODEL=FILE`` trains MODEL (a row name) at tuned settings (a `diffcl tune` overlay).
The new-item (cold-start) protocol, in a workspace of its own (its prepared split differs):
``--workspace WS --set prepare.held_out_items=0.2 --set train.negatives=trained_items``; every
table then adds the new items' cold R@20 / N@20.
Model selection is on validation only; test metrics are taken at the best validation epoch.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from diffcl.core.config import load_config
from diffcl.core.feature_files import model_feature_files, write_features
from diffcl.core.metrics import reports_cold
from diffcl.core.workspace import DatasetDirs
from diffcl.training.run import build_run
from diffcl.training.trainer import Trainer
from pipeline.embed import run_features
from pipeline.graphs import build_graphs
from pipeline.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
console = Console(width=200)
METRICS = ("recall@10", "recall@20", "ndcg@10", "ndcg@20")

DATASETS = {
    "scientific": ("configs/scientific.yaml", "Scientific (real MiniLM text, no images)"),
    "tiktok": ("configs/tiktok.yaml", "TikTok (real 128-d visual and acoustic features, published split)"),
}
MODELS = {
    "MF-BPR": ["model.name=mf"],
    "LightGCN": ["model.name=lightgcn"],
    "FREEDOM": ["model.name=freedom"],
    "DiffCL": ["model.name=diffcl"],
}
ABLATIONS = {
    "DiffCL (full)": [],
    # Embedding targets: Gaussian views of the same strength; target interactions: no generated graphs.
    "w/o diffusion": ["model.diffcl.diffusion.enabled=false"],
    # The control for the generated graphs: as many new edges per user, drawn uniformly instead of by the denoisers.
    "random edges instead of diffusion": ["model.diffcl.diffusion.graph_source=random"],
    "w/o contrastive loss": ["model.diffcl.contrastive=false"],
    "w/o alignment": ["model.diffcl.alignment=false"],
    "w/o item-item graph": ["model.diffcl.item_graph=false"],
    "w/o ID branch": ["model.diffcl.id_branch=false"],
    "ID only": ["model.diffcl.modalities=[]"],
}


def ablations_for(modalities: list[str]) -> dict[str, list[str]]:
    """Section 10's ablations plus each of the dataset's modalities alone."""
    alone = {f"{m} only": [f"model.diffcl.modalities=[{m}]"] for m in modalities} if len(modalities) > 1 else {}
    return {**ABLATIONS, **alone}


def run(config_path: str | Path, overrides: list[str], overlays: list[Path] | None = None) -> dict:
    trainer = build_run(load_config(config_path, overrides, overlays=overlays or []))
    start = time.perf_counter()
    metrics = trainer.fit().metrics
    metrics["wall"] = time.perf_counter() - start
    metrics["describe"] = trainer.model.describe()
    return metrics


def _prepared(dataset: str, workspace: str, extra: list[str], random_split: bool = False) -> Path | None:
    """The dataset's config after its data and features are prepared in ``workspace`` (with the
    ``--set`` overrides); None when its files under ../shared/data are absent, or when
    ``random_split`` asks for a random split of a dataset that ships its own."""
    config = ROOT / DATASETS[dataset][0]
    cfg = load_config(config, [f"workspace={workspace}", *extra])
    source = cfg.dataset.path or cfg.dataset.interactions
    if not Path(source).exists():
        console.print(f"skipped: {source} is absent")
        return None
    stats = prepare(cfg, progress=False).stats
    if random_split and stats["split"] != "random":
        console.print(f"skipped: {dataset} is split as {stats['split']!r}; --split-seeds needs a random split")
        return None
    run_features(cfg, progress=False)
    build_graphs(cfg)
    return config


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {sd:.4f}"


# The metric columns of every table, read from a run's metrics: the test metrics, the test recall of
# long-tail items (eval.head_share), then validation R@20.
_COLUMNS = {**{k: (lambda r, k=k: r["test"][k]) for k in METRICS},
            "tail R@20": lambda r: r["test"].get("tail_recall@20", float("nan")),
            "valid R@20": lambda r: r["valid"]["recall@20"]}
# Where the test split has items without a training interaction (TikTok's; prepare.held_out_items):
# the new items ranked alone, validation's cold R@20, and the new items' share of the full top 20.
_COLD_COLUMNS = {"cold R@20": lambda r: r["test"].get("cold_recall@20", float("nan")),
                 "cold N@20": lambda r: r["test"].get("cold_ndcg@20", float("nan")),
                 "valid cold R@20": lambda r: r["valid"].get("cold_recall@20", float("nan")),
                 "new share@20": lambda r: r["test"].get("new_share@20", float("nan"))}


def _seed_table(title: str, first: str, rows: dict[str, list[str]], config: Path, workspace: str, seeds: list[int],
                extra: list[str], overlays: dict[str, Path]) -> dict[str, list[dict]]:
    """One row per variant: test metrics at the best validation epoch, mean ± sd over ``seeds``.
    Returns each row's runs (their metrics)."""
    table, columns = None, _COLUMNS
    results = {}
    for name, overrides in rows.items():
        runs = [run(config, [f"workspace={workspace}", f"train.seed={s}", *overrides, *extra],
                    [overlays[name]] if name in overlays else None) for s in seeds]
        results[name] = runs
        if table is None:  # the columns as the first row's runs report them
            columns = {**_COLUMNS, **(_COLD_COLUMNS if reports_cold(runs[0]["test"]) else {})}
            table = Table(title=f"{title}: test at the best valid epoch, mean ± sd over seeds {seeds}")
            for col in (first, *columns, "best epochs", "s/run"):
                table.add_column(col, justify="right")
        table.add_row(_row_name(name, overlays), *(_mean_sd([value(r) for r in runs]) for value in columns.values()),
                      ",".join(str(r["best_epoch"]) for r in runs), f"{statistics.mean(r['wall'] for r in runs):.0f}")
        console.print(table)
    return results


def _row_name(name: str, overlays: dict[str, Path]) -> str:
    return name + (" (tuned)" if name in overlays else "")


def _split_overrides(dataset: str, split_seed: int | None) -> list[str]:
    """Another random split of the dataset: its own seed and dataset name, so that each split is
    prepared (and its features and graphs built) once, beside the others in the workspace."""
    own = load_config(ROOT / DATASETS[dataset][0])
    if split_seed is None or split_seed == own.prepare.seed:  # the config's own split: the dataset itself
        return []
    return [f"prepare.seed={split_seed}", f"dataset.name={own.dataset.name}-split{split_seed}"]


def _splits_table(title: str, first: str, per_split: dict[int, dict[str, list[dict]]], overlays: dict[str, Path]) -> None:
    """Each row over every split: the mean of the split means, ± the sd of the split means."""
    splits = list(per_split)
    table = Table(title=f"{title}: mean over random splits {splits} of each split's seed mean, ± sd over the splits")
    for col in (first, *_COLUMNS):
        table.add_column(col, justify="right")
    for name in per_split[splits[0]]:
        split_means = [{key: statistics.mean(value(r) for r in per_split[s][name]) for key, value in _COLUMNS.items()}
                       for s in splits]
        table.add_row(_row_name(name, overlays), *(_mean_sd([m[key] for m in split_means]) for key in _COLUMNS))
    console.print(table)


def _each_split(dataset: str, workspace: str, extra: list[str], split_seeds: list[int] | None):
    """(split seed or None, config, overrides) for the dataset's own split or each of ``split_seeds``,
    prepared; nothing when the data is absent or (with ``split_seeds``) the dataset ships its split,
    which the config's own dataset, prepared first, tells."""
    config = _prepared(dataset, workspace, extra, random_split=bool(split_seeds))
    if config is None:
        return
    for split_seed in split_seeds or [None]:
        split = _split_overrides(dataset, split_seed)
        if split and _prepared(dataset, workspace, [*split, *extra]) is None:  # the own split is prepared above
            return
        yield split_seed, config, [*split, *extra]


def _split_title(title: str, split_seed: int | None) -> str:
    return title + (f", random split {split_seed}" if split_seed is not None else "")


def part_accuracy(dataset: str, workspace: str, seeds: list[int], extra: list[str], models: list[str] | None,
                  overlays: dict[str, Path], split_seeds: list[int] | None = None) -> None:
    rows = {name: o for name, o in MODELS.items() if not models or name in models}
    title = DATASETS[dataset][1]
    per_split = {split_seed: _seed_table(_split_title(title, split_seed), "model", rows, config, workspace, seeds,
                                         overrides, overlays)
                 for split_seed, config, overrides in _each_split(dataset, workspace, extra, split_seeds)}
    if len(per_split) > 1:
        _splits_table(title, "model", per_split, overlays)


def part_ablations(dataset: str, workspace: str, seeds: list[int], extra: list[str], overlays: dict[str, Path],
                   variants: list[str] | None = None, split_seeds: list[int] | None = None) -> None:
    title = f"DiffCL ablations, {DATASETS[dataset][1]}"
    per_split, tuned = {}, {}
    for split_seed, config, overrides in _each_split(dataset, workspace, extra, split_seeds):
        cfg = load_config(config, [f"workspace={workspace}", *overrides, "model.name=diffcl"])
        # The modalities with features (Scientific has text only, though DiffCL's default asks for image too).
        modalities = list(model_feature_files(cfg, DatasetDirs.of(cfg.workspace, cfg.dataset.name).features))
        rows = {name: ["model.name=diffcl", *o] for name, o in ablations_for(modalities).items()
                if not variants or name in variants}
        # The ablations run at DiffCL's tuned settings when there are any.
        tuned = {name: overlays["DiffCL"] for name in rows} if "DiffCL" in overlays else {}
        per_split[split_seed] = _seed_table(_split_title(title, split_seed), "variant", rows, config, workspace, seeds,
                                            overrides, tuned)
    if len(per_split) > 1:
        _splits_table(title, "variant", per_split, tuned)


def part_timing(workspace: str, epochs: int, extra: list[str]) -> None:
    config = ROOT / "configs" / "baby.yaml"
    cfg = load_config(config, [f"workspace={workspace}"])
    if not Path(cfg.dataset.path).exists():
        console.print("skipped: ../shared/data/amazon-baby is absent")
        return
    prepare(cfg, progress=False)
    dirs = DatasetDirs.of(cfg.workspace, cfg.dataset.name)
    rng = np.random.default_rng(0)
    n_items = 7050
    # Stand-in features of the standard widths, for timing only (their content is noise).
    write_features(dirs.features / "image.parquet", rng.random((n_items, 4096), dtype=np.float32), {"note": "random stand-in"})
    write_features(dirs.features / "text.parquet", rng.standard_normal((n_items, 384), dtype=np.float32), {"note": "random stand-in"})
    build_graphs(cfg)
    base = [f"workspace={workspace}", f"train.epochs={epochs}", "train.patience=1000", "train.eval_every=1000", *extra]
    diffcl = MODELS["DiffCL"]
    variants = {
        **{name: MODELS[name] for name in ("MF-BPR", "LightGCN", "FREEDOM", "DiffCL")},
        "DiffCL, dense MLPs in fp32": [*diffcl, "model.diffcl.precision=fp32"],
        "DiffCL encoder + BPR only": [*diffcl, "model.diffcl.contrastive=false", "model.diffcl.alignment=false"],
        "DiffCL + alignment": [*diffcl, "model.diffcl.contrastive=false"],
        "DiffCL + contrastive, Gaussian views": [*diffcl, "model.diffcl.alignment=false", "model.diffcl.diffusion.enabled=false"],
        "DiffCL + contrastive, diffusion views": [*diffcl, "model.diffcl.alignment=false"],
    }
    # All variants are built first and timed round-robin, one epoch each per round, so that the
    # machine's drift over minutes falls on every variant alike (it otherwise swamps the differences
    # the split below is made of).
    trainers, resident = {}, {}
    for name, overrides in variants.items():
        before = _rss_gb()
        trainers[name] = build_run(load_config(config, [*base, *overrides]))
        _timed_epoch(trainers[name])  # warm-up, not counted
        resident[name] = _rss_gb() - before
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(epochs):
        for name, trainer in trainers.items():
            seconds[name].append(_timed_epoch(trainer))
    times = {name: statistics.median(values) for name, values in seconds.items()}
    table = Table(title=f"Baby, stand-in 4096-d visual and 384-d text features: seconds per training epoch "
                        f"(median of {epochs} epochs, variants interleaved)")
    for col in ("model", "s/epoch", "spread", "x LightGCN", "MMRec s/epoch", "resident GB"):
        table.add_column(col, justify="right")
    reference = {"MF-BPR": 0.8, "LightGCN": 3.2, "FREEDOM": 24.0}
    for name in variants:
        table.add_row(name, f"{times[name]:.2f}", f"{min(seconds[name]):.2f}-{max(seconds[name]):.2f}",
                      f"{times[name] / times['LightGCN']:.2f}", str(reference.get(name, "-")), f"{resident[name]:.2f}")
    console.print(table)
    encoder = times["DiffCL encoder + BPR only"]
    split = Table(title="Where a DiffCL epoch goes (differences between the variants above)")
    split.add_column("part")
    split.add_column("s/epoch", justify="right")
    split.add_column("share", justify="right")
    parts = {
        "image and text branches, projections, item graph, fusion, BPR": encoder,
        "ID branch and alignment loss (the ID branch is read only by it)": times["DiffCL + alignment"] - encoder,
        "contrastive loss (views without diffusion)": times["DiffCL + contrastive, Gaussian views"] - encoder,
        "diffusion (denoiser, its loss, reverse steps)": times["DiffCL + contrastive, diffusion views"]
        - times["DiffCL + contrastive, Gaussian views"],
    }
    for part, value in parts.items():
        split.add_row(part, f"{value:.2f}", f"{value / times['DiffCL']:.0%}")
    split.add_row("DiffCL total", f"{times['DiffCL']:.2f}", "100%")
    console.print(split)


def _timed_epoch(trainer: Trainer) -> float:
    start = time.perf_counter()
    trainer.train_epoch()
    trainer.epoch += 1
    return time.perf_counter() - start


def _rss_gb() -> float:
    """Resident memory of this process now (Linux), in GB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


def part_demo(workspace: str, extra: list[str]) -> None:
    from features.synthetic import generate

    src = Path(workspace) / "demo-source"
    generate(src)
    overrides = [f"workspace={workspace}", f"dataset.reviews={src / 'Demo_5.json.gz'}", f"dataset.meta={src / 'meta_Demo.json.gz'}"]
    config = ROOT / "configs" / "demo.yaml"
    cfg = load_config(config, overrides)
    prepare(cfg, progress=False)
    run_features(cfg, progress=False)
    build_graphs(cfg)
    table = Table(title="Synthetic demo (planted groups in text and pixels; images from an UNTRAINED tiny CLIP)")
    for col in ("model", *METRICS, "best epoch"):
        table.add_column(col, justify="right")
    demo_models = {
        **{name: MODELS[name] for name in ("MF-BPR", "LightGCN", "FREEDOM", "DiffCL")},
        # Whether the modality branches carry the signal: the same model without them.
        "DiffCL ID only": ["model.name=diffcl", "model.diffcl.modalities=[]"],
        "DiffCL text only": ["model.name=diffcl", "model.diffcl.modalities=[text]"],
        "DiffCL visual only": ["model.name=diffcl", "model.diffcl.modalities=[image]"],
        "FREEDOM without features": ["model.name=freedom", "model.freedom.modalities=[]"],
    }
    for name, model_overrides in demo_models.items():
        m = run(config, [*overrides, *model_overrides, *extra])
        table.add_row(name, *(f"{m['test'][k]:.4f}" for k in METRICS), str(m["best_epoch"]))
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["accuracy", "ablations", "timing", "demo"], action="append")
    parser.add_argument("--dataset", choices=list(DATASETS), action="append", help="accuracy / ablations (default: both)")
    parser.add_argument("--overlay", action="append", default=[], metavar="MODEL=FILE",
                        help="train a model row at the settings of a `diffcl tune` overlay")
    parser.add_argument("--seeds", type=int, nargs="+", default=[2024, 2025, 2026])
    parser.add_argument("--split-seeds", type=int, nargs="+", metavar="SEED",
                        help="accuracy / ablations: repeat on these random splits (prepare.seed; the config's own "
                             "seed is 2024) and add a table over the splits; not for datasets that ship a split")
    parser.add_argument("--timing-epochs", type=int, default=4)
    parser.add_argument("--workspace", default=None, help="default: a temporary folder")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="accuracy part: only these models")
    parser.add_argument("--variants", nargs="+", help="ablations part: only these rows (names as printed)")
    args = parser.parse_args()
    overlays = {name: Path(path) for name, _, path in (item.partition("=") for item in args.overlay)}
    datasets = args.dataset or list(DATASETS)
    logging.basicConfig(level=logging.WARNING)
    parts = args.part or ["accuracy", "ablations", "timing", "demo"]
    with tempfile.TemporaryDirectory() as tmp:
        workspace = args.workspace or tmp
        for part in parts:
            if part == "accuracy":
                for dataset in datasets:
                    part_accuracy(dataset, workspace, args.seeds, args.overrides, args.models, overlays, args.split_seeds)
            elif part == "ablations":
                for dataset in datasets:
                    part_ablations(dataset, workspace, args.seeds, args.overrides, overlays, args.variants, args.split_seeds)
            elif part == "timing":
                part_timing(workspace, args.timing_epochs, args.overrides)
            else:
                part_demo(workspace, args.overrides)


if __name__ == "__main__":
    main()
