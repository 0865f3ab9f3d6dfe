"""The ``diffcl`` Prefect flow: fetch -> prepare -> images -> the features of every modality (text,
image, and any other imported from a file) -> graphs -> train -> evaluate -> publish.

Each stage is a small task over a stage function of ``pipeline/``; tasks pass typed results (files
with content hashes, :mod:`flows.cache`), never DataFrames or tensors. Every stage but fetch is cached on
(code version, the config fields it reads, the content hashes of its inputs), with results
persisted under the workspace, so a rerun with nothing changed runs no stage and a change reruns
exactly what is downstream of it. Fetch always runs: it is the stage that asks the sources whether
they changed.

One run per workspace at a time (a lock in ``<workspace>/.pipeline.lock``, and on a shared workspace
a lease object at its URL as well): a second run waits up to
``orchestration.lock_wait_s`` and is then skipped with a log line. The fetch stage retries only
failures a later attempt may fix (:func:`transient_failure`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext
from prefect.transactions import get_transaction

from diffcl.core.config import ENCODED_MODALITIES, PipelineConfig, dump_config, load_config
from diffcl.core.locks import LockBusy, exclusive_lock
from diffcl.core.shared import shared_workspace
from flows.cache import (
    RESULTS_FOLDER,
    Artifact,
    CacheKey,
    Ledger,
    StageResult,
    artifact,
    base_key,
    dataset_dirs,
    is_shared,
    model_inputs,
    pull,
    push,
    results_folder,
    screen_stored_result,
)
from pipeline.demo import DEMO_CONFIG
from pipeline.embed import feature_modalities, shipped_features

log = logging.getLogger(__name__)


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    stage = context.task.name
    config, inputs = parameters["config"], parameters["inputs"]
    key = str(Ledger(config, stage).key(base_key(stage, config, inputs, parameters.get("modality"))))
    screen_stored_result(config, key)  # before Prefect reads it back
    return key


def _current_key(stage: str, config: dict[str, Any], inputs: dict[str, Artifact], modality: str | None = None) -> CacheKey:
    """The cache key this task run is stored under: Prefect's transaction holds it. Computing it
    again would re-hash the outputs, which the stage may just have rewritten."""
    transaction = get_transaction()
    if transaction is not None and transaction.key:
        return CacheKey.parse(transaction.key)
    return Ledger(config, stage).key(base_key(stage, config, inputs, modality))  # called outside a flow


def _finish(stage: str, config: dict[str, Any], inputs: dict[str, Artifact], outputs: dict[str, Artifact],
            info: dict[str, Any] | None = None, modality: str | None = None) -> StageResult:
    """Record the outputs in the ledger under the key this run was cached as."""
    key = _current_key(stage, config, inputs, modality)
    Ledger(config, stage).record(key, outputs)
    get_run_logger().info("%s: wrote %s", stage, ", ".join(outputs) or "nothing")
    return StageResult(stage, str(key), outputs, info or {})


def is_transient(exc: BaseException | None) -> bool:
    """Failures that a later attempt may fix: the network or a server (connection errors, timeouts,
    5xx, 408, 429). A missing file, a 404, a bad config or bad data fail at once."""
    import httpx

    from features.fetch import FetchError

    if isinstance(exc, FetchError):
        return exc.transient
    return isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError))


def transient_failure(task, task_run, state) -> bool:
    """Prefect's ``retry_condition_fn`` of the network stages."""
    return is_transient(state.result(raise_on_failure=False))


def _stage(name: str):
    # Results are stored as JSON, never pickled, and a stored record is read back only if it is one
    # (stage_cache_key screens it): a file planted in the result storage cannot run code.
    return task(name=name, cache_key_fn=stage_cache_key, persist_result=True, result_serializer="json")


# ------------------------------------------------------------------------------------- stages
@task(name="fetch", cache_policy=NONE)
def fetch_stage(config: dict[str, Any]) -> StageResult:
    """Fetch remote sources (conditional requests) and hash local ones. Never cached."""
    from dataclasses import asdict

    from pipeline.prepare import acquire

    raw = dataset_dirs(config).root / "raw"
    pull(config, raw)  # the dumps and their manifests: conditional requests see what another machine fetched
    acquired = acquire(load_config(config), progress=False)
    push(config, raw)
    outputs = {role: Artifact(str(path), m.sha256) for role, (path, m) in acquired.items()}
    manifests = {role: asdict(m) for role, (_, m) in acquired.items()}
    return StageResult("fetch", "", outputs, {"manifests": manifests})


@_stage("prepare")
def prepare_stage(config: dict[str, Any], inputs: dict[str, Artifact], manifests: dict[str, Any]) -> StageResult:
    from features.fetch import Manifest
    from pipeline.prepare import prepare

    cfg = load_config(config)
    pull(config, *inputs.values())
    acquired = {role: (Path(inputs[role].path), Manifest(**manifests[role])) for role in manifests}
    result = prepare(cfg, progress=False, acquired=acquired)
    push(config, *result.outputs.values())
    outputs = {name: artifact(path) for name, path in result.outputs.items()}
    return _finish("prepare", config, inputs, outputs, {"stats": {k: v for k, v in result.stats.items() if k != "inputs"}})


@_stage("images")
def images_stage(config: dict[str, Any], inputs: dict[str, Artifact]) -> StageResult:
    from pipeline.embed import download_images

    root = dataset_dirs(config).root
    synced = (root / "images", root / "features" / "image_sources.parquet")  # the URL-keyed image cache too
    pull(config, *inputs.values(), *synced)
    path = download_images(load_config(config), progress=False)
    push(config, *synced)
    return _finish("images", config, inputs, {"image_sources": artifact(path)} if path else {})


@_stage("text_features")
def text_features_stage(config: dict[str, Any], inputs: dict[str, Artifact]) -> StageResult:
    return _features_stage("text_features", "text", config, inputs)


@_stage("image_features")
def image_features_stage(config: dict[str, Any], inputs: dict[str, Artifact]) -> StageResult:
    return _features_stage("image_features", "image", config, inputs)


@_stage("features")
def modality_features_stage(config: dict[str, Any], inputs: dict[str, Artifact], modality: str) -> StageResult:
    """A modality other than text and image: imported from its configured or shipped file."""
    return _features_stage("features", modality, config, inputs, keyed_by_modality=True)


def _features_stage(stage: str, modality: str, config: dict[str, Any], inputs: dict[str, Artifact],
                    keyed_by_modality: bool = False) -> StageResult:
    from dataclasses import asdict

    from pipeline.embed import modality_features

    cfg = load_config(config)
    features = dataset_dirs(config).features
    cache = features / "cache"  # per-item embeddings, and the parts shards wrote elsewhere
    pull(config, *inputs.values(), cache)
    if modality == "image" and is_shared(config):
        from pipeline.embed import images_to_encode

        pull(config, *images_to_encode(cfg))  # the images whose vectors the cache lacks
    report = modality_features(cfg, modality, progress=False)
    path = features / f"{modality}.parquet"
    push(config, path, cache)
    outputs = {modality: artifact(path)} if report.status != "skipped" else {}
    return _finish(stage, config, inputs, outputs, {"report": asdict(report)}, modality if keyed_by_modality else None)


def _feature_file_inputs(cfg: PipelineConfig, modality: str) -> dict[str, Artifact]:
    """A modality's file from ``features.files`` as a stage input, so that its content keys the stage
    (a shipped file is an input of prepare, and so in stats.json already)."""
    path = cfg.features.files.get(modality)
    return {f"{modality}_file": artifact(path)} if path and Path(path).is_file() else {}


@_stage("graphs")
def graphs_stage(config: dict[str, Any], inputs: dict[str, Artifact]) -> StageResult:
    from pipeline.graphs import build_graphs

    pull(config, *inputs.values())
    report = build_graphs(load_config(config))
    folder = Path(report["dir"])
    push(config, folder)  # the graphs and their provenance sidecars
    outputs = {name: artifact(folder / f"{name}.npz") for name in report["graphs"]}
    return _finish("graphs", config, inputs, outputs, {"graphs": report["graphs"]})


class TrainingProgress:
    """Each epoch as a line in the flow run's log, and a progress artifact updated on evaluation
    epochs (at most once a second: each update is a call to the API)."""

    def __init__(self, cfg: PipelineConfig, logger):
        self.cfg, self.logger = cfg, logger
        self.trainer = None
        self.artifact_id = None
        self.updated_at = 0.0

    def epoch(self, trainer, row: dict[str, Any]) -> None:
        from diffcl.training.trainer import epoch_line

        self.trainer, metric = trainer, self.cfg.train.metric
        self.logger.info("train %s: %s", trainer.run_id, epoch_line(row, metric, trainer.best_epoch == row["epoch"]))
        if f"valid_{metric}" in row and time.monotonic() - self.updated_at >= 1.0:
            self.update(100.0 * row["epoch"] / self.cfg.train.epochs)

    def update(self, percent: float) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        from flows.reporting import artifact_key

        t = self.trainer
        if t is None:
            return
        note = (f"{t.run_id}: epoch {t.epoch} of at most {self.cfg.train.epochs}; best valid {self.cfg.train.metric} "
                f"{t.best_value:.4f} at epoch {t.best_epoch}" if t.best_epoch else f"{t.run_id}: epoch {t.epoch}")
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(percent, key=artifact_key(self.cfg, "training"), description=note)
        else:
            update_progress_artifact(self.artifact_id, percent, description=note)
        self.updated_at = time.monotonic()


@_stage("train")
def train_stage(config: dict[str, Any], inputs: dict[str, Artifact]) -> StageResult:
    """The run folder is named after the cache key (:func:`pipeline.train.train_resuming`)."""
    from pipeline.train import train_resuming

    cfg = load_config(config)
    key = _current_key("train", config, inputs)
    logger = get_run_logger()
    progress = TrainingProgress(cfg, logger)
    run_id = f"{cfg.model.name}-{key.base[:12]}"
    # The run's folders: run_id, or run_id-rN when it could not resume (pipeline.train).
    run_folders = dataset_dirs(config).runs / f"{run_id}*"
    pull(config, *model_inputs(config), run_folders)  # a run interrupted on another machine resumes here
    try:
        result = train_resuming(cfg, run_id, progress.epoch, logger)
    finally:
        push(config, run_folders)  # its checkpoints, even after a failure: the retry may run elsewhere
    progress.update(100.0)
    run = result.run_dir
    outputs = {name: artifact(run / name) for name in ("best.pt", "metrics.json", "history.parquet", "curves.png")}
    return _finish("train", config, inputs, outputs, {"run_dir": str(run), "best_epoch": result.metrics["best_epoch"]})


@_stage("evaluate")
def evaluate_stage(config: dict[str, Any], inputs: dict[str, Artifact], run_dir: str) -> StageResult:
    from pipeline.evaluate import write_evaluation

    pull(config, *model_inputs(config), run_dir)
    path, evaluation = write_evaluation(Path(run_dir))
    push(config, path)
    return _finish("evaluate", config, inputs, {"evaluation": artifact(path)},
                   {"valid": evaluation["valid"], "test": evaluation["test"]})


@_stage("publish")
def publish_stage(config: dict[str, Any], inputs: dict[str, Artifact], run_dir: str, data_hash: str,
                  id_tables: dict[str, str] | None = None) -> StageResult:
    import json
    from dataclasses import asdict

    from pipeline.publish import Registry, publish_run

    registry = dataset_dirs(config).root / "registry.json"
    pull(config, inputs["evaluation"], registry)
    if is_shared(config) and (champion := Registry(registry).production()) is not None:
        pull(config, *model_inputs(config), champion["run_dir"])  # rescored on this data
    evaluation = json.loads(Path(inputs["evaluation"].path).read_text())
    decision = publish_run(load_config(config), Path(run_dir), evaluation, data_hash, id_tables or {})
    push(config, registry)
    get_run_logger().info("registered v%d: %s (%s)", decision.version,
                          "promoted to production" if decision.promoted else "kept as challenger", decision.reason)
    # The registry file changes with every later version: nothing here to verify on a cache hit.
    return _finish("publish", config, inputs, {}, {"decision": asdict(decision)})


# --------------------------------------------------------------------------------------- flow
def _with_options(cfg: PipelineConfig):
    """Task options that depend on the config: result storage in the workspace, retries, timeouts.

    Network retries are bounded in two layers that do not overlap: :mod:`features.http` retries each
    request (``fetch.retries`` more attempts, capped backoff, Retry-After honoured); Prefect reruns
    the fetch stage only after that gave up on a transient failure, ``orchestration.network_retries``
    times. One dump thus gets at most (fetch.retries + 1) x (network_retries + 1) requests."""
    o = cfg.orchestration
    storage = _result_storage(cfg)
    delays = [o.retry_delay_s * 2**i for i in range(max(o.network_retries, 1))]

    def options(t, network: bool = False, retries: int = 0):
        kwargs: dict[str, Any] = {"timeout_seconds": o.stage_timeout_s}
        if t is not fetch_stage:
            kwargs["result_storage"] = storage
        if network:
            kwargs.update(retries=o.network_retries, retry_delay_seconds=delays, retry_condition_fn=transient_failure)
        elif retries:
            kwargs.update(retries=retries, retry_delay_seconds=0)
        return t.with_options(**kwargs)

    return options


@flow(name="diffcl", log_prints=True, validate_parameters=True)
def diffcl_flow(config: str = DEMO_CONFIG, overrides: list[str] | None = None,
                served_overrides: list[str] | None = None) -> dict[str, Any]:
    """The whole pipeline for one dataset config (a YAML path) with ``key=value`` overrides: those
    the deployment was served with first, then this run's (``overrides``), so a later one wins.
    Without ``configs/demo.yaml`` in the working directory the packaged demo config is used."""
    from pipeline.demo import ensure_demo_data, resolve_config

    logger = get_run_logger()
    cfg = load_config(resolve_config(config), [*(served_overrides or []), *(overrides or [])])  # validated first
    if served_overrides or overrides:
        logger.info("overrides: served %s, then this run's %s", served_overrides or [], overrides or [])
    if written := ensure_demo_data(cfg):
        logger.info("demo data written to %s", written)
    with contextlib.ExitStack() as held:
        try:
            wait = cfg.orchestration.lock_wait_s
            held.enter_context(exclusive_lock(Path(cfg.workspace) / ".pipeline.lock", timeout_s=wait))
            if (shared := shared_workspace(cfg)) is not None:  # an object store has no flock
                held.enter_context(shared.lease(".pipeline.lock", timeout_s=wait))
        except LockBusy as err:
            where = cfg.shared_workspace or cfg.workspace
            message = (f"skipped: another pipeline run ({err.holder}) works in {where} "
                       f"(waited {cfg.orchestration.lock_wait_s:g} s, orchestration.lock_wait_s)")
            logger.warning(message)
            return {"dataset": cfg.dataset.name, "skipped": message}
        return _run_stages(cfg, logger)


def _result_storage(cfg: PipelineConfig):
    """Where Prefect keeps the stages' results (JSON): in the workspace, so that a cache hit is
    found by any machine that shares it. Prefect takes a remote location only as a saved block,
    and a file:// one (a shared mount) only as a plain path."""
    fs, folder = results_folder(cfg)
    if "file" in fs.protocol:
        return Path(folder)
    shared = shared_workspace(cfg)
    import hashlib

    from prefect.filesystems import RemoteFileSystem

    block = RemoteFileSystem(basepath=f"{shared.url}/{RESULTS_FOLDER}")
    block.save(f"diffcl-results-{hashlib.sha256(shared.url.encode()).hexdigest()[:12]}", overwrite=True)
    return block


def _run_stages(cfg: PipelineConfig, logger) -> dict[str, Any]:
    from flows.reporting import publish_artifacts

    data = cfg.model_dump(mode="json")
    logger.info("diffcl pipeline for %s in %s", cfg.dataset.name, cfg.workspace)
    opt = _with_options(cfg)

    fetched = opt(fetch_stage, network=True)(data)
    prepared = opt(prepare_stage)(data, fetched.outputs, fetched.info["manifests"])
    items = {"items": prepared.outputs["items"], "stats": _stats_content(prepared)}
    images = opt(images_stage)(data, items)  # records failed downloads, never raises on them: no task retries
    _run_shards(cfg, "text", logger)
    text = opt(text_features_stage)(data, {**items, **_feature_file_inputs(cfg, "text")})
    _run_shards(cfg, "image", logger)
    image = opt(image_features_stage)(data, {**items, **images.outputs, **_feature_file_inputs(cfg, "image")})
    features = {**text.outputs, **image.outputs}
    shipped = shipped_features(cfg, prepared.info["stats"])
    for modality in feature_modalities(cfg, shipped):
        if modality not in ENCODED_MODALITIES:
            inputs = {**items, **_feature_file_inputs(cfg, modality)}
            features.update(opt(modality_features_stage)(data, inputs, modality).outputs)
    graphs = opt(graphs_stage)(data, {"interactions": prepared.outputs["interactions"], **features})
    trained = opt(train_stage, retries=1)(
        data, {"interactions": prepared.outputs["interactions"], **features, **graphs.outputs}
    )
    evaluated = opt(evaluate_stage)(data, {"best.pt": trained.outputs["best.pt"]}, trained.info["run_dir"])
    tables = prepared.info["stats"].get("tables", {})
    published = opt(publish_stage)(data, evaluated.outputs, trained.info["run_dir"],
                                   prepared.outputs["interactions"].sha256,
                                   {name: tables[name] for name in ("users.parquet", "items.parquet") if name in tables})
    summary = {
        "dataset": cfg.dataset.name,
        "run_dir": trained.info["run_dir"],
        "valid": evaluated.info["valid"],
        "test": evaluated.info["test"],
        "decision": published.info["decision"],
        "stats": prepared.info["stats"],
        "config": dump_config(cfg),
    }
    publish_artifacts(cfg, summary)
    return summary


def _run_shards(cfg: PipelineConfig, modality: str, logger) -> None:
    """With ``features.shard_items``: the modality's shards, run on the configured task runner
    before its features stage merges them (:mod:`flows.scaleout`)."""
    if cfg.features.shard_items:
        from flows.scaleout import encode_shards

        logger.info("%s shards encoded %d item(s)", modality, encode_shards(cfg, modality))


def _stats_content(prepared: StageResult) -> Artifact:
    """stats.json as an input of the feature stages, keyed on its content without source locations."""
    from pipeline.prepare import stats_content_hash

    return Artifact(prepared.outputs["stats"].path, stats_content_hash(prepared.info["stats"]))
