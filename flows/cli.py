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
    list[str] | None,  # noqa: UP007 - typer needs Optional here
    typer.Option("--set", "-s", help="override a config key: --set prepare.kcore=10 (repeatable)"),
]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
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


def _load(config: Path, overrides: list[str] | None):
    from diffcl.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as err:
        _fail(str(err))


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
    from features.prepare import prepare as run_prepare
    from features.records import DataError

    cfg = _load(config, set_)
    try:
        result = run_prepare(cfg, progress=console.is_terminal)
    except (DataError, FetchError) as err:
        _fail(str(err))
    console.print(stats_table(result.stats))
    console.print(f"written to {result.dirs.prepared}")


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Argument(help="folder to write the dataset into")] = Path("workspace/demo-source"),
    users: Annotated[int, typer.Option(help="number of users")] = 400,
    items: Annotated[int, typer.Option(help="number of items")] = 240,
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
