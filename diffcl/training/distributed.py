"""Data-parallel training with torch.distributed (DDP), launched by ``torchrun``.

Every rank holds the whole model and the same sampler stream (same seed); each takes its own
slice of every global batch (``train.batch_size`` stays the global batch), DDP averages the
gradients, so an epoch makes the same steps as one process would. Rank 0 alone writes the run
folder and evaluates; it broadcasts the metrics so that early stopping is decided alike on every
rank. NCCL on GPUs (one per rank: ``LOCAL_RANK``), gloo on CPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from diffcl.models import Batch
from diffcl.training.sampler import BPRSampler
from diffcl.training.trainer import Trainer, TrainResult


def world_size() -> int:
    """Processes of this training run: torchrun's WORLD_SIZE (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


class ShardedBPRSampler(BPRSampler):
    """The same batches on every rank (same seed), each rank yielding its slice of each batch.
    A final batch smaller than the number of ranks is dropped: every rank must make as many steps."""

    def __init__(self, *args, rank: int, world: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.rank, self.world = rank, world

    def epoch(self):
        for tensors in super().epoch():
            if len(tensors[0]) >= self.world:
                yield tuple(t.tensor_split(self.world)[self.rank] for t in tensors)


class _LossModule(torch.nn.Module):
    """The model's loss as forward(): DDP synchronises gradients of what its forward returns."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.model.loss(batch)


class DistributedTrainer(Trainer):
    def __init__(self, config, run_id: str | None = None, **kwargs):
        self.rank, self.world = int(os.environ["RANK"]), world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = config.train.device != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)  # "cuda" then means this rank's GPU
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        super().__init__(config, run_id, **kwargs)
        self.run_id = _broadcast(self.run_id)  # one run folder: rank 0's (possibly generated) id
        self.run_dir = self.dirs.runs / self.run_id
        tc = config.train
        self.sampler = ShardedBPRSampler(self.data.train, tc.batch_size, tc.seed, rank=self.rank, world=self.world)
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            _LossModule(self.model), device_ids=[local_rank] if use_cuda else None,
            find_unused_parameters=True,  # a model's loss may leave some parameters out of a step
        )
        if self.rank != 0:
            self.on_epoch = None

    def _loss(self, batch: Batch) -> dict[str, torch.Tensor]:
        return self.ddp(batch)

    def train_epoch(self) -> dict[str, float]:
        means = super().train_epoch()
        values = torch.tensor(list(means.values()), dtype=torch.float64)
        dist.all_reduce(values)  # the loss reported is the mean over ranks
        return dict(zip(means, (values / self.world).tolist(), strict=True))

    def evaluate(self, split: str) -> dict[str, float]:
        return _broadcast(super().evaluate(split) if self.rank == 0 else None)

    def _create_run_dir(self) -> None:
        if self.rank == 0:
            super()._create_run_dir()
        self.run_id = _broadcast(self.run_id)  # rank 0's, should the id have been taken meanwhile
        self.run_dir = self.dirs.runs / self.run_id

    def fit(self) -> TrainResult:
        if self.rank == 0:
            return super().fit()  # the run folder's lock is held by rank 0
        self._create_run_dir()
        return self._fit_locked()

    def _save(self, name: str, obj: Any) -> None:
        if self.rank == 0:
            super()._save(name, obj)

    def _save_progress(self) -> None:
        if self.rank == 0:
            super()._save_progress()

    def _log_epoch(self, row: dict[str, Any]) -> None:
        if self.rank == 0:
            super()._log_epoch(row)

    def finish(self) -> TrainResult:
        if self.rank == 0:
            return _broadcast(super().finish())
        for split in self.final_splits:
            self.evaluate(split)  # rank 0's final evaluations are collective
        return _broadcast(None)


def _broadcast(value: Any) -> Any:
    """Rank 0's value on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
