"""The evaluate stage: a run's best weights scored again on the current prepared data, through the
same model loading and evaluation path as training (:func:`diffcl.training.run.load_model`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from diffcl.core.io import write_json_atomic
from diffcl.training.evaluator import evaluate_model
from diffcl.training.run import load_model


def evaluate_run(run_dir: Path, splits: tuple[str, ...] = ("valid", "test"), same_data: bool = True) -> dict[str, Any]:
    """``{"model", "dataset", split: metrics, ..., "eval_seconds": seconds of the first split}``;
    ``same_data=False`` scores a run on re-prepared data with the same users and items (a champion
    rescored)."""
    loaded = load_model(Path(run_dir), same_data=same_data)
    result: dict[str, Any] = {"model": loaded.config.model.name, "dataset": loaded.config.dataset.name}
    for split in splits:
        start = time.perf_counter()
        result[split] = evaluate_model(loaded.model, loaded.evaluator, split)
        result.setdefault("eval_seconds", time.perf_counter() - start)
    return result


def write_evaluation(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """``evaluation.json`` in the run folder (valid and test metrics, the seconds one split took),
    and what it holds."""
    path = Path(run_dir) / "evaluation.json"
    evaluation = evaluate_run(run_dir)
    write_json_atomic(path, evaluation)
    return path, evaluation
