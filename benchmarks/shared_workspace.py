"""The demo pipeline on a workspace shared through an fsspec URL (file:// here; s3:// the same code)
against a local one: what the syncing costs, and what a machine with an empty disk pays to find
every stage cached.

    nice -n 10 .venv/bin/python benchmarks/shared_workspace.py

Each run is a fresh `diffcl run` process (temporary Prefect server included). Rows: local workspace
cold and warm; shared workspace cold (every stage runs, outputs pushed), warm (nothing changed), and
"fresh machine": the local copy deleted, so each cached stage's outputs come down from the share.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DIFFCL = [sys.executable, "-m", "flows", "run"]


def timed(args: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run([*DIFFCL, *args], check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    env = {**os.environ, "PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-home-")}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "local").mkdir()
        rows.append(("local workspace, cold", timed([], env, tmp / "local"), None))
        rows.append(("local workspace, warm (nothing changed)", timed([], env, tmp / "local"), None))
        shared, copy = tmp / "share", tmp / "shared-run" / "copy"
        copy.parent.mkdir()
        # The demo data is written under ./workspace/demo-source of the working folder; the copy elsewhere.
        args = ["--set", f"shared_workspace=file://{shared}", "--set", f"workspace={copy}"]
        rows.append(("shared (file://), cold: every stage runs, outputs pushed", timed(args, env, copy.parent), None))
        rows.append(("shared, warm (nothing changed)", timed(args, env, copy.parent), None))
        shutil.rmtree(copy)
        rows.append(("shared, fresh machine: empty local copy, every stage cached", timed(args, env, copy.parent),
                     size_mb(copy)))
        share_mb = size_mb(shared)
    table = Table(title="diffcl run on the demo data: local vs shared workspace (each a fresh process)")
    table.add_column("run")
    table.add_column("seconds", justify="right")
    table.add_column("MB brought down", justify="right")
    for name, seconds, pulled in rows:
        table.add_row(name, f"{seconds:.1f}", "" if pulled is None else f"{pulled:.1f}")
    Console().print(table)
    print(f"shared workspace after the runs: {share_mb:.1f} MB")


if __name__ == "__main__":
    main()
