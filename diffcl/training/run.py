"""Training runs from a config and the workspace: the composition root that does the I/O (threads,
device, the prepared data, the features and their kNN graphs, seeding) and hands the trainer its
parts; and the one way back from a run folder to a model (:func:`load_model`)."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from diffcl.core.config import ConfigError, PipelineConfig, load_config
from diffcl.core.device import keep_freed_memory, resolve_device
from diffcl.core.feature_files import FeatureFileError, model_feature_files, read_item_features
from diffcl.core.prepared import PreparedDataError
from diffcl.core.workspace import DatasetDirs, RunIdError, check_run_id, new_run_id
from diffcl.data import InteractionData
from diffcl.graph_files import GraphFileError, load_knn_graph
from diffcl.models import ModelContext, Recommender, build_model
from diffcl.training.errors import TrainError
from diffcl.training.evaluator import Evaluator
from diffcl.training.run_folder import (
    RunFolder,
    data_changed_message,
    load_checkpoint,
    recorded_data_hash,
)
from diffcl.training.sampler import BPRSampler, negative_candidates
from diffcl.training.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed every generator; on CPU also ask torch for its deterministic kernels. With two or more
    threads the default ones (the backward of an embedding lookup, of indexing with repeated rows)
    accumulate in whatever order the threads finish, and a run differed from its rerun by up to 5e-3
    in DiffCL's weights after three demo epochs; with them, bit for bit, at no measured cost (0.23 vs
    0.25 s per DiffCL epoch on Scientific, the same for LightGCN and MF). Not on CUDA, where the
    deterministic kernels are slower and cuBLAS needs an environment setting first."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device is not None:  # a process-wide switch: set for every run, so a CPU run's never leaks into a CUDA one
        torch.use_deterministic_algorithms(device.type == "cpu", warn_only=True)


def pick_device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except ValueError as err:
        raise TrainError(f"train.device: {err}") from None


def load_data(config: PipelineConfig) -> tuple[DatasetDirs, InteractionData]:
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    if not (dirs.prepared / "interactions.parquet").exists():
        raise TrainError(f"no prepared data in {dirs.prepared}; run `diffcl prepare` first")
    try:
        return dirs, InteractionData.load(dirs.prepared)
    except PreparedDataError as err:
        raise TrainError(str(err)) from None


def build_context(config: PipelineConfig, dirs: DatasetDirs, data: InteractionData, device: torch.device) -> ModelContext:
    """The data, the features of the modalities the model reads and their kNN graphs (built by the
    graphs stage): a missing or unusable feature or graph file is a TrainError naming it."""
    gc = config.graphs
    ctx = ModelContext(data=data, device=device, modality_weights=gc.modality_weights, seed=config.train.seed,
                       new_items=data.new_items if config.train.negatives == "trained_items" else None)
    try:
        for modality, path in model_feature_files(config, dirs.features).items():  # none for ID-only models
            matrix, meta = read_item_features(path, data.n_items)
            if meta.get("untrained"):
                log.warning("%s features: %s", modality, meta.get("note", "untrained encoder"))
            ctx.features[modality] = matrix
            ctx.knn_graphs[modality] = load_knn_graph(dirs.graphs, modality, path, gc.knn_k, data.n_items, gc.ann_above)
            log.info("%s features %s with their kNN graph", modality, matrix.shape)
    except (FeatureFileError, GraphFileError) as err:
        raise TrainError(str(err)) from None
    return ctx


def _model_and_evaluator(config: PipelineConfig, dirs: DatasetDirs, data: InteractionData,
                         device: torch.device) -> tuple[Recommender, Evaluator]:
    """The configured model (seeded, on its features and graphs) and the evaluator of the data."""
    seed_everything(config.train.seed, device)
    try:
        model = build_model(config.model.name, build_context(config, dirs, data, device), config.model)
    except KeyError as err:
        raise TrainError(str(err.args[0])) from None
    return model, Evaluator(data, config.eval.topk, config.eval.batch_users, device, config.eval.head_share)


def build_run(config: PipelineConfig, run_id: str | None = None,
              on_epoch: Callable[[dict[str, Any]], None] | None = None, evaluate_test: bool = True) -> Trainer:
    """A trainer for one run of ``config`` into ``runs/<run_id>`` (generated when None; an existing
    folder of an explicit id resumes). Data-parallel when launched by torchrun (WORLD_SIZE > 1)."""
    from diffcl.training.distributed import DistributedTrainer, world_size

    tc = config.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    keep_freed_memory()  # a step frees and reallocates the same large tensors: reuse, don't remap
    try:
        explicit = run_id is not None
        run_id = check_run_id(run_id) if explicit else new_run_id(config.model.name)
    except RunIdError as err:
        raise TrainError(str(err)) from None
    distributed = world_size() > 1
    device = DistributedTrainer.join(tc.device) if distributed else pick_device(tc.device)
    dirs, data = load_data(config)
    model, evaluator = _model_and_evaluator(config, dirs, data, device)
    run = RunFolder(dirs.runs, run_id, config, data.source_hash, explicit)
    if distributed:
        return DistributedTrainer(model, data.train, evaluator, tc, run, on_epoch, evaluate_test)
    sampler = BPRSampler(data.train, tc.batch_size, tc.seed, candidates=negative_candidates(data.train, tc.negatives))
    return Trainer(model, sampler, evaluator, tc, run, on_epoch, evaluate_test)


def train(config: PipelineConfig, run_id: str | None = None) -> TrainResult:
    """One training run (see :func:`build_run`); under torchrun the ranks leave the process group
    together once it is done."""
    from diffcl.training.distributed import DistributedTrainer

    trainer = build_run(config, run_id)
    result = trainer.fit()
    if isinstance(trainer, DistributedTrainer):
        trainer.leave()
    return result


@dataclass
class LoadedModel:
    """A run's model with its best weights, on the data it is evaluated on."""

    run_dir: Path
    config: PipelineConfig
    dirs: DatasetDirs
    data: InteractionData
    model: Recommender
    evaluator: Evaluator


def load_model(run_dir: Path, same_data: bool = True) -> LoadedModel:
    """A finished (or interrupted) run's model with its best weights. Refused with a clear error
    when the prepared data has changed since the run was trained, unless ``same_data`` is off (a
    champion rescored on new data with the same users and items)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise TrainError(f"{run_dir} is not a run folder (no config.yaml)")
    best = run_dir / "best.pt"
    if not best.exists():
        raise TrainError(f"{run_dir}: no best.pt checkpoint yet")
    try:
        config = load_config(yaml.safe_load(config_path.read_text()))
    except ConfigError as err:
        raise TrainError(f"{config_path}: {err}") from None
    dirs, data = load_data(config)
    recorded = recorded_data_hash(run_dir)
    if same_data and recorded and recorded != data.source_hash:
        raise TrainError(data_changed_message(run_dir, recorded, data.source_hash))
    device = pick_device(config.train.device)
    model, evaluator = _model_and_evaluator(config, dirs, data, device)
    weights = load_checkpoint(best, device)
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:  # a run without a recorded data hash, trained on other data
        raise TrainError(f"{best} does not fit the current data or model ({str(err).splitlines()[0][:160]}); "
                         "train a new run: `diffcl train CONFIG`") from None
    return LoadedModel(run_dir, config, dirs, data, model, evaluator)
