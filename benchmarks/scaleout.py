"""Scale-out on existing engines: Dask-sharded text features, exact vs FAISS kNN graphs, DDP on CPU.

    nice -n 19 .venv/bin/python benchmarks/scaleout.py [--feature-items 20000] [--knn-sizes 10000 100000 1000000]

1. text features (packaged all-MiniLM-L6-v2) of N synthetic items, sharded (features.shard_items)
   on a local Dask cluster of 1 and 2 single-threaded workers: seconds and speed-up. Each worker
   loads its own model and runs one torch thread, so the speed-up is bounded by the cores free;
2. the item kNN graph at each size (64-d clustered features, k = 10): exact (torch top-k, skipped
   above --exact-max: O(items²)) and FAISS HNSW, each in a fresh process for its peak RSS
   (which includes torch's ~0.3 GB), with recall@k of the approximate graph on 1,000 sampled rows;
3. MF training on the demo dataset, one process vs DDP over gloo with 2 processes: metrics, seconds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

K = 10


# ----------------------------------------------------------------------------------- features
def _feature_workspace(root: Path, n_items: int):
    import polars as pl

    from diffcl.core.config import load_config
    from diffcl.core.prepared import table_hashes

    prepared = root / "toy" / "prepared"
    prepared.mkdir(parents=True)
    words = ["stroller", "bottle", "crib", "rattle", "monitor", "blanket", "car seat", "bib"]
    pl.DataFrame({
        "item": np.arange(n_items), "item_id": [f"I{i}" for i in range(n_items)],
        "title": [f"{words[i % 8]} model {i} in {words[(i * 7) % 8]} colour" for i in range(n_items)],
        "brand": [f"brand {i % 97}" for i in range(n_items)], "categories": [["Baby", words[i % 8]] for i in range(n_items)],
        "description": [None] * n_items, "text": [None] * n_items, "image_url": [None] * n_items,
        "source_row": [None] * n_items,
    }, schema_overrides={"source_row": pl.Int64, "description": pl.String, "text": pl.String,
                         "image_url": pl.String}).write_parquet(prepared / "items.parquet")
    (prepared / "stats.json").write_text(json.dumps({"tables": table_hashes(prepared, ("items.parquet",))}))
    return load_config({"workspace": str(root), "dataset": {"name": "toy", "source": "tables", "interactions": "x.csv"},
                        "features": {"image": {"enabled": False}}})


def bench_features(n_items: int, shard_items: int) -> None:
    import distributed

    from flows.prefect_env import apply_offline_defaults
    from pipeline.embed import run_features

    apply_offline_defaults()
    from flows.scaleout import encode_shards

    seconds = {}
    for workers in (1, 2):
        with tempfile.TemporaryDirectory() as tmp, distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            config = _feature_workspace(Path(tmp), n_items)
            config = config.model_copy(update={
                "features": config.features.model_copy(update={"shard_items": shard_items}),
                "orchestration": config.orchestration.model_copy(
                    update={"task_runner": "dask", "dask_address": cluster.scheduler_address}),
            })
            start = time.perf_counter()
            encode_shards(config, "text")
            run_features(config, progress=False)
            seconds[workers] = time.perf_counter() - start
        print(f"features  {n_items} items, {workers} Dask worker(s): {seconds[workers]:.1f} s "
              f"({n_items / seconds[workers]:.0f} items/s)", flush=True)
    print(f"features  speed-up 2 vs 1 worker: {seconds[1] / seconds[2]:.2f}x", flush=True)


# ---------------------------------------------------------------------------------------- kNN
def _clustered(n: int, d: int = 64, clusters: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    return centres[rng.integers(clusters, size=n)] + 0.5 * rng.standard_normal((n, d)).astype(np.float32)


def _knn_case(n: int, backend: str, queue) -> None:
    from diffcl.ann import faiss_knn_graph, knn_recall
    from diffcl.graphs import knn_graph

    x = _clustered(n)
    start = time.perf_counter()
    graph = knn_graph(x, K) if backend == "exact" else faiss_knn_graph(x, K)
    seconds = time.perf_counter() - start
    recall = knn_recall(x, graph, K, sample=1000)
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss: KiB on Linux
    queue.put((seconds, peak_gb, recall))


def bench_knn(sizes: list[int], exact_max: int) -> None:
    ctx = mp.get_context("spawn")
    for n in sizes:
        for backend in ("exact", "faiss"):
            if backend == "exact" and n > exact_max:
                print(f"knn       {n:>8} items, exact: skipped (above --exact-max {exact_max}; O(items²))", flush=True)
                continue
            queue = ctx.SimpleQueue()
            proc = ctx.Process(target=_knn_case, args=(n, backend, queue))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                print(f"knn       {n:>8} items, {backend}: failed (exit {proc.exitcode})", flush=True)
                continue
            seconds, peak_gb, recall = queue.get()
            print(f"knn       {n:>8} items, {backend:5}: {seconds:8.1f} s, peak RSS {peak_gb:5.2f} GB, "
                  f"recall@{K} {recall:.3f}", flush=True)


# ---------------------------------------------------------------------------------------- DDP
def _ddp_rank(rank: int, world: int, port: int, config, queue) -> None:
    from diffcl.training.run import train

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    start = time.perf_counter()
    result = train(config, run_id="ddp")
    if rank == 0:
        queue.put((result.metrics, time.perf_counter() - start))


def bench_ddp(epochs: int) -> None:
    import torch.multiprocessing as tmp_mp

    from diffcl.core.config import load_config
    from diffcl.training.run import train
    from features.synthetic import DemoSpec, generate
    from pipeline.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        paths = generate(Path(tmp) / "source", DemoSpec())
        base = {"workspace": f"{tmp}/ws", "dataset": {"name": "demo", "source": "amazon2018",
                                                      "reviews": str(paths["reviews"]), "meta": str(paths["meta"])}}
        prepare(load_config(base), progress=False)
        config = load_config(base, ["model.name=mf", f"train.epochs={epochs}", "train.batch_size=512",
                                    "train.lr=0.01", f"train.patience={epochs}", "train.threads=1", "train.device=cpu"])
        start = time.perf_counter()
        single = train(config, run_id="single").metrics
        single_s = time.perf_counter() - start
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        queue = tmp_mp.get_context("spawn").SimpleQueue()
        start = time.perf_counter()
        tmp_mp.spawn(_ddp_rank, args=(2, port, config, queue), nprocs=2, join=True)
        wall = time.perf_counter() - start
        ddp, _ = queue.get()
    for name, metrics, seconds in (("1 process", single, single_s), ("DDP 2 gloo", ddp, wall)):
        print(f"ddp       {name:10}: {seconds:6.1f} s wall ({metrics['epoch_seconds']:.3f} s/epoch), "
              f"test recall@20 {metrics['test']['recall@20']:.4f}, ndcg@20 {metrics['test']['ndcg@20']:.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--feature-items", type=int, default=20_000)
    parser.add_argument("--shard-items", type=int, default=2_500)
    parser.add_argument("--knn-sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--exact-max", type=int, default=100_000)
    parser.add_argument("--ddp-epochs", type=int, default=20)
    parser.add_argument("--skip", nargs="*", default=[], choices=["features", "knn", "ddp"])
    args = parser.parse_args()
    if "features" not in args.skip:
        bench_features(args.feature_items, args.shard_items)
    if "knn" not in args.skip:
        bench_knn(args.knn_sizes, args.exact_max)
    if "ddp" not in args.skip:
        bench_ddp(args.ddp_epochs)


if __name__ == "__main__":
    main()
