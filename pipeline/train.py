"""The train stage: one run into a folder named after the stage's cache key, so that a retry (or the
next flow run after a failure) resumes from its last checkpoint instead of starting over."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from diffcl.core.config import PipelineConfig
from diffcl.training.errors import ResumeRefused
from diffcl.training.run import build_run
from diffcl.training.trainer import Trainer, TrainResult
from pipeline.publish import check_publish_metric

log = logging.getLogger(__name__)


def train_resuming(config: PipelineConfig, base_id: str, on_epoch: Callable[[Trainer, dict[str, Any]], None] | None = None,
                   logger: logging.Logger | logging.LoggerAdapter = log) -> TrainResult:
    """Train into ``base_id`` (resuming it), or, when that folder cannot resume (other training
    config or data, broken history), into the first of ``base_id-r1``, ``-r2``, ... that can, saying
    so on ``logger``. ``on_epoch(trainer, row)`` sees every epoch. A ``publish.metric`` the data
    cannot report is refused here, before training, rather than by the publish stage after it."""
    run_id, attempt = base_id, 0
    while True:
        trainer = build_run(config, run_id)
        check_publish_metric(config.publish.metric, trainer.evaluator.reported_metrics("valid"))
        if on_epoch is not None:
            trainer.on_epoch = lambda row, trainer=trainer: on_epoch(trainer, row)
        try:
            return trainer.fit()
        except ResumeRefused as err:
            attempt += 1
            run_id = f"{base_id}-r{attempt}"
            logger.warning("train: %s; starting a fresh run folder %s instead", err, run_id)
