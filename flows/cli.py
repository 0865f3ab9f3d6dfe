"""The one command line, ``diffcl``: a thin layer over the stages in ``features`` and ``diffcl``.

It sits in ``flows/`` because it is the top of the stack: it may call the orchestration, while the
model library below knows nothing of it. Heavy imports happen inside the commands, so
``diffcl --help`` stays fast.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from pipeline.demo import DEMO_CONFIG

app = typer.Typer(
    name="diffcl",
    help="From raw Amazon review dumps to a trained, evaluated DiffCL recommender.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file", exists=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="override a config key: --set prepare.kcore=10 (repeatable)"),
]
OverlayOpt = Annotated[
    list[Path] | None,
    typer.Option("--overlay", "-o", help="YAML mapping merged onto the config before --set, e.g. the "
                 "tuning/<study>-best.yaml of `diffcl tune` (repeatable, in order)"),
]


@app.callback()
def _main(ctx: typer.Context, verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    from flows.prefect_env import apply_offline_defaults

    apply_offline_defaults()
    if ctx.invoked_subcommand in ("run", "serve"):
        return  # Prefect's own log format names the task run of every line
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def _load(config: Path, overrides: list[str] | None, overlays: list[Path] | None = None):
    from diffcl.core.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [], overlays or [])
    except ConfigError as err:
        _fail(str(err))


def _load_local(config: Path, overrides: list[str] | None, overlays: list[Path] | None = None):
    """The config of a stage command: these work on a local workspace, the flow syncs a shared one."""
    cfg = _load(config, overrides, overlays)
    if cfg.shared_workspace:
        _fail(f"{config}: shared_workspace {cfg.shared_workspace} is synced by the flow: run `diffcl run` (or the "
              "deployment); the stage commands work on a local workspace")
    return cfg


def _overlay_sets(overlays: list[Path] | None) -> list[str]:
    """The overlays as ``--set`` items, for the flow (which takes a config and overrides)."""
    from diffcl.core.config import ConfigError, deep_merge, overlay_overrides, read_overlay

    merged: dict = {}
    try:
        for path in overlays or []:
            merged = deep_merge(merged, read_overlay(path))
    except ConfigError as err:
        _fail(str(err))
    return overlay_overrides(merged)


def stats_table(stats: dict) -> Table:
    table = Table(title=f"prepared: {stats['dataset']} ({stats['source']}, {stats['split']} split)")
    table.add_column("users", justify="right")
    table.add_column("items", justify="right")
    table.add_column("interactions", justify="right")
    table.add_column("train", justify="right")
    table.add_column("valid", justify="right")
    table.add_column("test", justify="right")
    table.add_column("density", justify="right")
    table.add_column("seconds", justify="right")
    table.add_row(
        *(f"{stats[k]:,}" for k in ("users", "items", "interactions", "train", "valid", "test")),
        f"{stats['density']:.5f}",
        f"{stats['seconds']['total']:.2f}",
    )
    return table


@app.command()
def prepare(config: ConfigArg, set_: SetOpt = None) -> None:
    """Fetch, parse, filter and split a dataset into prepared Parquet tables."""
    from features.fetch import FetchError
    from features.records import DataError
    from pipeline.prepare import prepare as run_prepare

    cfg = _load_local(config, set_)
    try:
        result = run_prepare(cfg, progress=console.is_terminal)
    except (DataError, FetchError) as err:
        _fail(str(err))
    console.print(stats_table(result.stats))
    console.print(f"written to {result.dirs.prepared}")


@app.command()
def features(config: ConfigArg, set_: SetOpt = None) -> None:
    """Every modality's features into features/<name>.parquet: imported from features.files or a
    shipped <name>_feat.npy, else text (SBERT) and images (CLIP) embedded incrementally."""
    from pipeline.embed import FeatureError, run_features

    cfg = _load_local(config, set_)
    try:
        reports = run_features(cfg, progress=console.is_terminal)
    except (FeatureError, RuntimeError, ValueError) as err:
        _fail(str(err))
    table = Table(title=f"features: {cfg.dataset.name}")
    for col in ("modality", "status", "items", "embedded", "reused", "missing", "items/s", "seconds"):
        table.add_column(col, justify="right")
    for r in reports:
        rate = f"{r.items_per_s:.1f}" if r.embedded else "-"
        table.add_row(r.modality, r.status, f"{r.items:,}", f"{r.embedded:,}", f"{r.reused:,}", f"{r.missing:,}",
                      rate, f"{r.seconds:.2f}")
    console.print(table)
    for r in reports:
        if r.note:
            console.print(f"[bold]{r.modality}:[/] {r.note}")


@app.command()
def graphs(config: ConfigArg, set_: SetOpt = None) -> None:
    """Build the frozen item-item kNN graph of each modality (those current already are kept)."""
    from pipeline.graphs import build_graphs

    cfg = _load_local(config, set_)
    try:
        report = build_graphs(cfg)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    if not report["graphs"]:
        console.print(f"no modality features: no kNN graph to build in {report['dir']} (the interaction graph "
                      "is built by training itself)")
        return
    table = Table(title=f"graphs in {report['dir']}")
    for col in ("graph", "items", "edges", "", "seconds"):
        table.add_column(col, justify="right")
    for name, info in report["graphs"].items():
        table.add_row(name, f"{info['items']:,}", f"{info['edges']:,}", "built" if info["built"] else "current, kept",
                      f"{info['seconds']:.2f}")
    console.print(table)


def metrics_table(metrics: dict) -> Table:
    """One row per metric (every cut-off of ``eval.topk`` the run reports), one column per split:
    reads well in any terminal width."""
    from diffcl.core.metrics import metric_names, reports_cold, reports_tail

    best = f" (best epoch {metrics['best_epoch']} of {metrics['epochs']})" if "best_epoch" in metrics else ""
    table = Table(title=f"{metrics['model']} on {metrics['dataset']}{best}")
    table.add_column("metric")
    table.add_column("valid", justify="right")
    table.add_column("test", justify="right")
    ks = sorted({int(name.split("@")[1]) for name in metrics["valid"] if "@" in name})
    cold = any(reports_cold(metrics.get(split, {})) for split in ("valid", "test"))
    for key in metric_names(ks, tail=reports_tail(metrics["valid"]), cold=cold):
        table.add_row(key, *(f"{metrics[split].get(key, float('nan')):.4f}" for split in ("valid", "test")))
    per_epoch = f"{metrics['epoch_seconds']:.2f} s per epoch, " if "epoch_seconds" in metrics else ""
    table.caption = f"{per_epoch}{metrics['eval_seconds']:.2f} s per full evaluation"
    return table


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    run_id: Annotated[str | None, typer.Option(help="run folder name (letters, digits, . _ -); an existing run resumes")] = None,
    overlay: OverlayOpt = None,
) -> None:
    """Train the configured model; test metrics are taken at the best validation epoch."""
    from diffcl.training.errors import TrainError
    from diffcl.training.run import train as run_train

    cfg = _load_local(config, set_, overlay)
    try:
        result = run_train(cfg, run_id)
    except TrainError as err:
        _fail(str(err))
    console.print(metrics_table(result.metrics))
    console.print(f"run folder: {result.run_dir}")


def _short_key(key: str, model: str) -> str:
    """train.lr -> lr, model.diffcl.diffusion.noise_scale -> diffusion.noise_scale."""
    for prefix in (f"model.{model}.", "model.", "train."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _format_value(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def trials_table(result, model: str) -> Table:
    table = Table(title=f"study {result.study}: valid {result.metric} per trial")
    notes = any(t.note for t in result.trials)
    for col, justify in (("trial", "right"), ("state", "left"), ("value", "right"), ("params", "left"),
                         ("epochs", "right"), ("seconds", "right"), *((("note", "left"),) if notes else ())):
        table.add_column(col, justify=justify)
    best = result.best.number if result.best else None
    for t in result.trials:
        params = " ".join(f"{_short_key(k, model)}={_format_value(v)}" for k, v in t.params.items())
        table.add_row(f"{t.number}{' *' if t.number == best else ''}", t.state,
                      "-" if t.value is None else f"{t.value:.4f}", params, "-" if t.epochs is None else str(t.epochs),
                      "-" if t.seconds is None else f"{t.seconds:.1f}", *((t.note,) if notes else ()))
    from diffcl.training.tuning import score_label

    table.caption = f"value: the trial's valid metric {score_label(result)} (pruned: at the last evaluation); * best trial"
    return table


@app.command()
def tune(
    config: ConfigArg,
    trials: Annotated[int, typer.Option("--trials", "-n", help="finished (complete or pruned) trials the study should hold; "
                                        "a rerun after an interruption completes the rest")],
    study: Annotated[str | None, typer.Option(help="study name (default: model.name); tuning/<study>.db in the dataset folder")] = None,
    max_epochs: Annotated[int | None, typer.Option(help="cap on train.epochs per trial")] = None,
    timeout: Annotated[float | None, typer.Option(help="start no trial after this many seconds")] = None,
    prune_warmup: Annotated[int, typer.Option(help="no trial is pruned before this epoch; raise it for models that "
                                              "learn slowly and peak late (DiffCL on Scientific: epoch ~100)")] = 5,
    select_window: Annotated[int, typer.Option(help="score a trial by its best mean validation over this many "
                                               "consecutive evaluations (K x train.eval_every epochs; all of them where "
                                               "a trial has fewer; 1: its best one): a noisy curve's one lucky epoch "
                                               "then cannot win. Fixed per study. A run of the overlay still keeps its "
                                               "single best epoch")] = 1,
    set_: SetOpt = None,
    overlay: OverlayOpt = None,
) -> None:
    """Search the model's hyper-parameters on the validation metric (Optuna TPE, median pruning);
    the best trial becomes a config overlay. The test split is never evaluated."""
    import optuna

    from diffcl.core.config import ConfigError, overlay_overrides
    from diffcl.training.errors import TrainError
    from diffcl.training.tuning import SearchBudget, TuneError, budget_line
    from diffcl.training.tuning import tune as run_tune

    cfg = _load_local(config, set_, overlay)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # diffcl.training.tuning logs each trial; errors end the command
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("diffcl.training.trainer").setLevel(logging.WARNING)  # per-epoch lines with --verbose
    try:
        result = run_tune(cfg, SearchBudget(trials, max_epochs, timeout, prune_warmup_epochs=prune_warmup,
                                             select_window=select_window), study)
    except (TuneError, TrainError, ConfigError) as err:
        _fail(str(err))
    console.print(trials_table(result, cfg.model.name))
    console.print(f"budget: {budget_line(result)}; study {result.storage}")
    if result.best is None:
        _fail("no trial completed (all pruned or failed): nothing to write; run more --trials")
    console.print(f"best: trial {result.best.number}, valid {result.metric} {result.best.value:.4f}; "
                  f"overlay {result.overlay_path}")
    console.print("as --set: " + " ".join(f"--set {item}" for item in overlay_overrides(result.overlay)), highlight=False)


@app.command("config")
def config_reference(
    config: ConfigArg,
    set_: SetOpt = None,
    overlay: OverlayOpt = None,
    key: Annotated[str | None, typer.Option(help="only this key or the keys below it, e.g. model.diffcl")] = None,
    changed: Annotated[bool, typer.Option("--changed", help="only the keys whose value is not the default")] = False,
) -> None:
    """Every key of the resolved config (after overlays and --set): its value, its default and what it means."""
    from rich.text import Text

    from diffcl.core.config import ConfigError, keys_under

    cfg = _load(config, set_, overlay)
    try:
        keys = keys_under(cfg, key)
    except ConfigError as err:
        _fail(str(err))
    table = Table(title=f"{config}{f': {key}' if key else ''}")
    table.add_column("key", no_wrap=True)
    table.add_column("value", overflow="fold", max_width=30)
    table.add_column("default", overflow="fold", max_width=30)
    table.add_column("what it is", ratio=1)
    for k in keys:
        if changed and not k.changed:
            continue
        # Text, not markup: values such as [image, audio] are not rich tags.
        table.add_row(k.key, Text(str(k.value), style="bold" if k.changed else ""), Text(str(k.default)),
                      Text(k.description))
    table.caption = "bold: set by the config, an overlay or --set (differs from the default)"
    console.print(table)


@app.command()
def evaluate(run_dir: Annotated[Path, typer.Argument(help="a run folder (runs/<run-id>)")]) -> None:
    """Evaluate a run's best checkpoint again on validation and test."""
    import json

    from diffcl.training.errors import TrainError
    from pipeline.evaluate import evaluate_run

    try:
        evaluation = evaluate_run(run_dir)
    except TrainError as err:
        _fail(str(err))
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else {}
    metrics.update(evaluation)
    console.print(metrics_table(metrics))


@app.command()
def recommend(
    run_dir: Annotated[Path, typer.Argument(help="a run folder (runs/<run-id>)")],
    user: Annotated[str, typer.Option(help="user: original id (e.g. reviewerID) or integer id")],
    k: Annotated[int, typer.Option(help="how many items (at most the items the user has not seen)")] = 20,
) -> None:
    """Top-K items for one user (items seen in training and validation are left out)."""
    import polars as pl
    import torch

    from diffcl.training.errors import TrainError
    from diffcl.training.run import load_model

    if k < 1:
        _fail(f"--k must be at least 1 (got {k})")
    try:
        loaded = load_model(run_dir)
    except TrainError as err:
        _fail(str(err))
    prepared = loaded.dirs.prepared
    users = pl.read_parquet(prepared / "users.parquet")
    match = users.filter(pl.col("user_id") == user)
    if match.height == 0 and user.isdigit() and int(user) < users.height:
        match = users.filter(pl.col("user") == int(user))
    if match.height == 0:
        _fail(f"unknown user {user!r} (neither an original id nor an integer id in {prepared / 'users.parquet'})")
    uid = int(match.get_column("user")[0])
    seen = (loaded.data.train + loaded.data.valid).tocsr()
    unseen = loaded.data.n_items - seen[uid].nnz
    if unseen == 0:
        _fail(f"user {user!r} has seen every item: nothing to recommend")
    k = min(k, unseen)  # beyond this only seen items (score -inf) would follow
    with torch.no_grad():
        loaded.model.eval()
        user_emb, item_emb = loaded.model.embeddings()
        top, scores = loaded.evaluator.top_items(user_emb, item_emb, torch.tensor([uid]), seen, k)
    items = pl.read_parquet(prepared / "items.parquet", columns=["item", "item_id", "title"])
    ranked = pl.DataFrame({"item": top[0].numpy(), "score": scores[0].numpy()}).join(items, on="item", how="left")
    table = Table(title=f"top {k} for user {match.get_column('user_id')[0]} ({run_dir.name})")
    for col in ("rank", "item_id", "title", "score"):
        table.add_column(col)
    for rank, row in enumerate(ranked.iter_rows(named=True), start=1):
        table.add_row(str(rank), row["item_id"], row["title"] or "", f"{row['score']:.3f}")
    console.print(table)


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="YAML config file, or a preset: baby, sports, clothing "
                                           "(default: ./configs/demo.yaml, else the packaged demo config)")] = Path(DEMO_CONFIG),
    set_: SetOpt = None,
    overlay: OverlayOpt = None,
) -> None:
    """Run the whole pipeline as a Prefect flow in this process (temporary local server, no setup).
    The demo writes its synthetic data under ./workspace/demo-source when it is missing."""
    import json

    from diffcl.training.errors import TrainError
    from flows.flow import diffcl_flow
    from flows.reporting import feature_notes
    from pipeline.demo import ensure_demo_data, resolve_config
    from pipeline.publish import PublishError, RegistryBusy

    config = Path(resolve_config(config))
    overrides = _overlay_sets(overlay) + list(set_ or [])  # the flow takes a config and overrides
    cfg = _load(config, overrides)  # validated before starting Prefect: what the flow will run
    if written := ensure_demo_data(cfg):
        console.print(f"demo data written to {written}")
    source = str(config.resolve()) if config.exists() else str(config)  # or a preset name
    try:
        summary = diffcl_flow(config=source, overrides=overrides)
    except (TrainError, PublishError, RegistryBusy) as err:  # e.g. another `diffcl run` trains the same run
        _fail(str(err))
    if summary.get("skipped"):
        _fail(summary["skipped"])
    metrics = json.loads((Path(summary["run_dir"]) / "metrics.json").read_text())
    metrics.update(valid=summary["valid"], test=summary["test"])  # from the evaluate stage
    console.print(metrics_table(metrics))
    for note in feature_notes(cfg):
        console.print(note.replace("**", ""), style="bold yellow")
    decision = summary["decision"]
    console.print(f"model v{decision['version']}: {'promoted to production' if decision['promoted'] else 'kept as challenger'} "
                  f"({decision['reason']}); run folder {summary['run_dir']}")


@app.command()
def serve(
    config: Annotated[Path, typer.Argument(help="YAML config file")] = Path(DEMO_CONFIG),
    set_: SetOpt = None,
    cron: Annotated[str | None, typer.Option(help="cron schedule (default: orchestration.cron, weekly)")] = None,
    timezone: Annotated[str | None, typer.Option(help="time zone of the schedule (default: orchestration.timezone)")] = None,
) -> None:
    """Register and serve the deployment diffcl/full-pipeline on its schedule (needs a Prefect API).
    The --set overrides are the deployment's served_overrides: a run's overrides apply on top."""
    from pipeline.demo import resolve_config

    config = Path(resolve_config(config))
    _load(config, set_)
    from prefect import serve as prefect_serve

    from flows.deploy import build_deployment

    deployment = build_deployment(config, list(set_ or []), cron, timezone)
    prefect_serve(deployment)


@app.command()
def models(config: Annotated[Path, typer.Argument(help="YAML config file")] = Path(DEMO_CONFIG)) -> None:
    """List the registered models of a dataset; * marks the production model."""
    from rich import box

    from diffcl.core.workspace import DatasetDirs
    from pipeline.demo import resolve_config
    from pipeline.publish import Registry

    cfg = _load(Path(resolve_config(config)), [])
    registry = Registry(DatasetDirs.of(cfg.workspace, cfg.dataset.name).root / "registry.json")
    if not registry.versions:
        console.print(f"no registered models for {cfg.dataset.name}")
        return
    production, metric = registry.data["production"], cfg.publish.metric
    # Fits 80 columns: the metric is named once in the title, the time to the minute.
    table = Table(title=f"models of {cfg.dataset.name}: {metric} (* production)", box=box.SIMPLE_HEAD)
    for col in ("version", "model", "valid", "test", "registered (UTC)"):
        table.add_column(col)
    table.add_column("run folder", no_wrap=True)
    for v in registry.versions:
        mark = " *" if v["version"] == production else ""
        table.add_row(f"v{v['version']}{mark}", v["model"], f"{v['valid'].get(metric, float('nan')):.4f}",
                      f"{v['test'].get(metric, float('nan')):.4f}", v["registered_at"][:16].replace("T", " "),
                      Path(v["run_dir"]).name)
    console.print(table)


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="folder to write the dataset into")] = Path("workspace/demo-source"),
    users: Annotated[int, typer.Option(help="number of users")] = 500,
    items: Annotated[int, typer.Option(help="number of items")] = 600,
    groups: Annotated[int, typer.Option(help="planted item groups (at most 8)")] = 6,
    seed: Annotated[int, typer.Option(help="random seed")] = 7,
    image_base_url: Annotated[
        str | None,  # noqa: UP007
        typer.Option(help="URL prefix of the images (default: file:// URL of OUT)"),
    ] = None,
) -> None:
    """Write a small synthetic dataset in the Amazon 2018 raw format, with images."""
    from features.synthetic import DemoSpec, generate

    paths = generate(out, DemoSpec(users=users, items=items, groups=groups, seed=seed), image_base_url)
    console.print(f"demo data: {paths['reviews']}, {paths['meta']}, {items} images in {paths['images']}")


def main() -> None:  # pragma: no cover - console entry point
    app()
