"""Time the whole Prefect pipeline on the demo data: a cold run, a warm rerun with nothing changed,
and a rerun after appending new interactions; and Prefect's own start-up for comparison.

    .venv/bin/python benchmarks/flow_runs.py

Each run is a fresh `diffcl run` process (temporary Prefect server included), as a user runs it,
started with no config in an empty folder outside the checkout: the packaged demo config is used
and the demo data written under ./workspace (issue 13.11). Target: the no-change rerun within
max(15 s, 10% of the cold run).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DIFFCL = [sys.executable, "-m", "flows"]


def timed(cmd: list[str], env: dict[str, str], cwd: Path = ROOT) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    env = {**os.environ, "PREFECT_HOME": tempfile.mkdtemp(prefix="prefect-home-")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = [*DIFFCL, "run"]  # no config, in an empty folder
        cold = timed(run, env, tmp)
        reviews = tmp / "workspace" / "demo-source" / "Demo_5.json.gz"
        print(f"diffcl run in an empty folder: demo data written: {reviews.is_file()}, "
              f"registry: {(tmp / 'workspace' / 'demo' / 'registry.json').is_file()}")
        warm = timed(run, env, tmp)
        lines = gzip.decompress(reviews.read_bytes()).decode().splitlines()
        records = [json.loads(line) for line in lines[-200:]]
        users = sorted({json.loads(line)["reviewerID"] for line in lines[:200]})
        new = [{**r, "reviewerID": users[i % len(users)], "unixReviewTime": r["unixReviewTime"] + 1} for i, r in enumerate(records)]
        reviews.write_bytes(gzip.compress(("\n".join(lines + [json.dumps(r) for r in new]) + "\n").encode()))
        appended = timed(run, env, tmp)
        trivial = timed([sys.executable, "-c", "from flows.prefect_env import apply_offline_defaults as a; a(); "
                         "from prefect import flow; flow(name='noop')(lambda: 1)()"], env)
    table = Table(title="diffcl run on the demo data (each a fresh process with a temporary Prefect server)")
    table.add_column("run")
    table.add_column("seconds", justify="right")
    table.add_row("cold (every stage runs, demo data written)", f"{cold:.1f}")
    table.add_row("warm, nothing changed (fetch + cache hits)", f"{warm:.1f}")
    table.add_row("after appending 200 interactions", f"{appended:.1f}")
    table.add_row("Prefect alone: start-up + an empty flow", f"{trivial:.1f}")
    table.caption = (f"warm/cold {warm / cold:.2f}; target: warm <= max(15 s, 10% of cold) = {max(15.0, 0.1 * cold):.1f} s; "
                     f"{trivial / warm:.0%} of the warm run is Prefect's own start-up")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
