"""Data-parallel training (DDP over gloo, 2 CPU processes) matches one process within noise."""

from __future__ import annotations

import os
import socket

import pytest
import torch.multiprocessing as mp

from diffcl.training.run import train

# With a weight average, which every rank keeps from rank 0's broadcast weights.
SETTINGS = ["model.name=mf", "train.epochs=6", "train.eval_every=2", "train.batch_size=512", "train.lr=0.01",
            "train.patience=5", "train.threads=1", "train.device=cpu", "train.ema_decay=0.5"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, config, results) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    result = train(config, run_id="ddp")  # the ranks leave the process group together
    results.put((rank, {**result.metrics, "loss": result.history.get_column("loss").to_list()}))
    # About 1 run in 10 here, a rank still aborted in interpreter teardown after all of the above
    # ("terminate called without an active exception", a C++ thread destroyed while joinable):
    # the result is already sent, so leave without the teardown. Known gap, noted on issue 15.
    os._exit(0)


def test_ddp_two_gloo_processes_match_single_process(demo_workspace):
    config = demo_workspace(*SETTINGS)
    result = train(config, run_id="single")
    single = {**result.metrics, "loss": result.history.get_column("loss").to_list()}
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.spawn(_rank, args=(2, _free_port(), config, results), nprocs=2, join=True)
    metrics = dict(results.get() for _ in range(2))
    assert metrics[0] == metrics[1]  # the same (rank 0's) metrics on every rank
    ddp = metrics[0]
    assert ddp["run_id"] == "ddp" and (config.workspace / "demo" / "runs" / "ddp" / "metrics.json").exists()
    # Each rank's half batch, gradients averaged by DDP: the steps of one process, up to rounding.
    assert ddp["loss"][-1] < ddp["loss"][0]
    assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-3)
    for split in ("valid", "test"):
        for name, value in single[split].items():
            assert ddp[split][name] == pytest.approx(value, abs=0.03 + 0.1 * value), (split, name)
