"""Train the ID baselines on real data and print accuracy and speed against the reference toolbox.

    .venv/bin/python benchmarks/baselines.py                      # Baby, MF-BPR and LightGCN
    .venv/bin/python benchmarks/baselines.py --models lightgcn --set train.epochs=50

Reference (MMRec on this 2-core machine, same data; ../shared/docs/performance-notes.md):
LightGCN 3.2 s per epoch and 3.6 s per full evaluation, MF-BPR 0.8 s per epoch; MMRec's own
LightGCN / MF-BPR reached test Recall@20 0.0727 / 0.0549 on this split.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from diffcl.core.config import load_config
from diffcl.training.run import train
from pipeline.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = {  # model: (MMRec s/epoch, MMRec s/eval, MMRec test R@20 on this split, published R@20)
    "mf": (0.8, 3.3, 0.0549, 0.0575),
    "lightgcn": (3.2, 3.6, 0.0727, 0.0754),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "baby.yaml"))
    parser.add_argument("--models", nargs="+", default=["mf", "lightgcn"])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)])

    base = load_config(args.config, args.overrides)
    source = Path(base.dataset.path or base.dataset.interactions or "")
    if not source.exists():
        print(f"skipped: {source} is absent")
        return
    prepare(base, progress=False)
    table = Table(title=f"{base.dataset.name}: test metrics at the best validation epoch")
    for column in ("model", "R@10", "N@10", "R@20", "N@20", "best epoch", "epochs", "s/epoch", "s/eval",
                   "MMRec s/epoch", "MMRec s/eval", "MMRec R@20", "published R@20", "wall s"):
        table.add_column(column, justify="right")
    for name in args.models:
        config = load_config(args.config, [*args.overrides, f"model.name={name}"])
        start = time.perf_counter()
        metrics = train(config).metrics
        wall = time.perf_counter() - start
        test = metrics["test"]
        ref = REFERENCE.get(name, (None,) * 4)
        table.add_row(
            name, *(f"{test[k]:.4f}" for k in ("recall@10", "ndcg@10", "recall@20", "ndcg@20")),
            str(metrics["best_epoch"]), str(metrics["epochs"]),
            f"{metrics['epoch_seconds']:.2f}", f"{metrics['eval_seconds']:.2f}",
            *(f"{v}" if v is not None else "-" for v in ref), f"{wall:.0f}",
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
