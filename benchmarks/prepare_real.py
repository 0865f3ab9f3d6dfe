"""Time the data stage on the real datasets in ../shared/data and print a table.

    .venv/bin/python benchmarks/prepare_real.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from diffcl.core.config import load_config
from pipeline.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["baby.yaml", "scientific.yaml"]


def main() -> None:
    table = Table(title="diffcl prepare on real data (wall seconds, one process, warm imports)")
    for col in ("dataset", "users", "items", "interactions", "train", "valid", "test", "seconds"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        for name in CONFIGS:
            cfg = load_config(ROOT / "configs" / name, [f"workspace={tmp}"])
            source = cfg.dataset.path or cfg.dataset.interactions
            if not Path(source).exists():
                table.add_row(cfg.dataset.name, *["-"] * 6, "absent")
                continue
            start = time.perf_counter()
            stats = prepare(cfg, progress=False).stats
            seconds = time.perf_counter() - start
            table.add_row(cfg.dataset.name, *(f"{stats[k]:,}" for k in ("users", "items", "interactions", "train", "valid", "test")), f"{seconds:.2f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
