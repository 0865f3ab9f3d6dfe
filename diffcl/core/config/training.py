"""Config of training and evaluation (``train``, ``eval``)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from diffcl.core.config.base import Strict

# The config sections that define a training run, read by the train stage's cache key and by a
# run's resume check (diffcl.training.trainer.training_identity), less the train settings that choose where
# the work runs, not what is trained.
TRAINING_SECTIONS = ("model", "train", "graphs", "eval")
RESULT_NEUTRAL_TRAIN_FIELDS = ("device", "threads")


class TrainConfig(Strict):
    """The shared trainer: BPR sampling, Adam, early stopping on validation."""

    epochs: int = Field(1000, ge=1, description="upper bound on training epochs")
    batch_size: int = Field(2048, ge=1, description="positive pairs per step (one negative each)")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    ema_decay: float = Field(0.0, ge=0, lt=1, description=(
        "per-step decay of an exponential moving average of the weights, which validation, test and the "
        "saved model use (0.99: about the last 100 steps); 0: the raw weights"))
    seed: int = Field(2024, description="seed of Python, numpy and torch")
    patience: int = Field(20, ge=1, description="stop after this many evaluations without a better valid metric")
    eval_every: int = Field(1, ge=1, description="evaluate on validation every this many epochs")
    metric: str = Field("recall@20", description="validation metric for early stopping and model selection")
    negatives: Literal["all_items", "trained_items"] = Field(
        "all_items", description="where the ranking loss's sampled negatives are drawn (BPR's; not the contrastive "
        "loss's: model.diffcl.negatives): every item (the field's toolkits), or only the "
        "items with a training interaction, so that items new to the model (prepare.held_out_items) are never seen "
        "in training and start with zero ID rows: the cold-start protocol"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda when available")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; null: torch's default")


class EvalConfig(Strict):
    topk: list[Annotated[int, Field(gt=0)]] = Field([5, 10, 20, 50], min_length=1, description="cut-offs K of every metric")
    batch_users: int = Field(4096, ge=1, description="users scored at once in full ranking")
    head_share: float = Field(
        0.2, ge=0, lt=1, description="the most-interacted share of the training items counted as head; recall of "
        "the other (long-tail) relevant items is reported as tail_recall@K (0: not reported)"
    )
