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
from diffcl.training.averaging import WeightAverage
from diffcl.training.sampler import BPRSampler, negative_candidates
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
    """Built by :func:`diffcl.training.run.build_run` after :meth:`join`; takes the training matrix
    instead of a sampler, since each rank samples its own slice."""

    def __init__(self, model, train_matrix, evaluator, settings, run, on_epoch=None, evaluate_test: bool = True):
        self.rank, self.world = dist.get_rank(), world_size()
        sampler = ShardedBPRSampler(train_matrix, settings.batch_size, settings.seed, rank=self.rank, world=self.world,
                                    candidates=negative_candidates(train_matrix, settings.negatives))
        super().__init__(model, sampler, evaluator, settings, run, on_epoch if self.rank == 0 else None, evaluate_test)
        run.run_id = _broadcast(run.run_id)  # one run folder: rank 0's (possibly generated) id
        use_cuda = self.device.type == "cuda"
        self.ddp = torch.nn.parallel.DistributedDataParallel(
            _LossModule(self.model), device_ids=[self.device.index] if use_cuda else None,
            find_unused_parameters=True,  # a model's loss may leave some parameters out of a step
        )
        if self.average:  # from rank 0's weights, which DDP has just broadcast
            self.average = WeightAverage(self.model, settings.ema_decay)

    @staticmethod
    def join(device_setting: str) -> torch.device:
        """Join torchrun's process group (NCCL with this rank's GPU, else gloo); the device to use."""
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_setting != "cpu" and torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")

    @staticmethod
    def leave() -> None:
        """Leave the process group together: a rank tearing it down while another still talks to it
        can abort the other in gloo's threads."""
        dist.barrier()
        dist.destroy_process_group()

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
        self.run.run_id = _broadcast(self.run.run_id)  # rank 0's, should the id have been taken meanwhile

    def fit(self) -> TrainResult:
        if self.rank == 0:
            return super().fit()  # the run folder's lock is held by rank 0
        self.check_metric()  # every rank raises with rank 0, before the run id broadcast it would wait on
        self._create_run_dir()
        return self._fit_locked()

    def _save_best(self) -> None:
        if self.rank == 0:
            super()._save_best()

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
