"""The ``diffcl`` Prefect flow: fetch -> prepare -> images -> the features of every modality (text,
image, and any other imported from a file) -> graphs -> train -> evaluate -> publish.

Each stage is a small task over a library function of ``features/`` or ``diffcl/``; tasks pass
file paths with content hashes, never DataFrames or tensors. Every stage but fetch is cached on
(code version, the config fields it reads, the content hashes of its inputs), with results
persisted under the workspace, so a rerun with nothing changed runs no stage and a change reruns
exactly what is downstream of it. Fetch always runs: it is the stage that asks the sources whether
they changed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import TaskRunContext
from prefect.transactions import get_transaction

from diffcl.config import ENCODED_MODALITIES, PipelineConfig, dump_config, load_config
from features.feature_stage import feature_modalities, shipped_features
from flows.stages import Artifact, Ledger, artifact, base_key

log = logging.getLogger(__name__)

StageResult = dict[str, Any]  # {"stage", "key", "outputs": {name: Artifact}, "info": {...}}


def stage_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    stage = context.task.name
    config, inputs = parameters["config"], parameters["inputs"]
    return Ledger(config, stage).key(base_key(stage, config, inputs, parameters.get("modality")))


def _current_key(stage: str, config: dict[str, Any], inputs: dict[str, Artifact], modality: str | None = None) -> str:
    """The cache key this task run is stored under: Prefect's transaction holds it. Computing it
    again would re-hash the outputs, which the stage may just have rewritten."""
    transaction = get_transaction()
    if transaction is not None and transaction.key:
        return transaction.key
    return Ledger(config, stage).key(base_key(stage, config, inputs, modality))  # called outside a flow


def _finish(stage: str, config: dict[str, Any], inputs: dict[str, Artifact], outputs: dict[str, Artifact],
            info: dict[str, Any] | None = None, modality: str | None = None) -> StageResult:
    """Record the outputs in the ledger under the key this run was cached as."""
    key = _current_key(stage, config, inputs, modality)
    Ledger(config, stage).record(key, outputs)
    get_run_logger().info("%s: wrote %s", stage, ", ".join(outputs) or "nothing")
    return {"stage": stage, "key": key, "outputs": outputs, "info": info or {}}


def _stage(name: str):
    return task(name=name, cache_key_fn=stage_cache_key, persist_result=True)


# ------------------------------------------------------------------------------------- stages
@task(name="fetch", cache_policy=NONE)
def fetch_stage(config: dict[str, Any]) -> StageResult:
    """Fetch remote sources (conditional requests) and hash local ones. Never cached."""
    from dataclasses import asdict

    from features.prepare import acquire

    acquired = acquire(load_config(config), progress=False)
    outputs = {role: {"path": str(path), "sha256": m.sha256} for role, (path, m) in acquired.items()}
    manifests = {role: asdict(m) for role, (_, m) in acquired.items()}
    return {"stage": "fetch", "outputs": outputs, "info": {"manifests": manifests}}


@_stage("prepare")
def prepare_stage(config: dict[str, Any], inputs: dict[str, Artifact], manifests: dict[str, Any]) -> StageResult:
    from features.fetch import Manifest
    from features.prepare import prepare

    cfg = load_config(config)
    acquired = {role: (Path(inputs[role]["path"]), Manifest(**manifests[role])) for role in manifests}
    result = prepare(cfg, progress=False, acquired=acquired)
    outputs = {name: artifact(path) for name, path in result.outputs.items()}
    return _finish("prepare", config, inputs, outputs, {"stats": {k: v for k, v in result.stats.items() if k != "inputs"}})


@_stage("images")
def images_stage(config: dict[str, Any], inputs: dict[str, Artifact]) -> StageResult:
    from features.feature_stage import download_images

    path = download_images(load_config(config), progress=False)
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

    from diffcl.workspace import DatasetDirs
    from features.feature_stage import modality_features

    cfg = load_config(config)
    report = modality_features(cfg, modality, progress=False)
    path = DatasetDirs.of(cfg.workspace, cfg.dataset.name).features / f"{modality}.parquet"
    outputs = {modality: artifact(path)} if report.status != "skipped" else {}
    return _finish(stage, config, inputs, outputs, {"report": asdict(report)}, modality if keyed_by_modality else None)


def _feature_file_inputs(cfg: PipelineConfig, modality: str) -> dict[str, Artifact]:
    """A modality's file from ``features.files`` as a stage input, so that its content keys the stage
    (a shipped file is an input of prepare, and so in stats.json already)."""
    path = cfg.features.files.get(modality)
    return {f"{modality}_file": artifact(path)} if path and Path(path).is_file() else {}


@_stage("graphs")
def graphs_stage(config: dict[str, Any], inputs: dict[str, Artifact]) -> StageResult:
    from diffcl.graph_stage import build_graphs

    report = build_graphs(load_config(config))
    folder = Path(report["dir"])
    outputs = {name: artifact(folder / f"{name}.npz") for name in report["graphs"]}
    return _finish("graphs", config, inputs, outputs, {"graphs": report["graphs"]})


@_stage("train")
def train_stage(config: dict[str, Any], inputs: dict[str, Artifact]) -> StageResult:
    """The run folder is named after the cache key, so a retry (or the next flow run after a
    failure) resumes from the last checkpoint instead of starting over."""
    from diffcl.trainer import Trainer

    cfg = load_config(config)
    key = _current_key("train", config, inputs)
    run_id = f"{cfg.model.name}-{key.rsplit('-', 2)[1][:12]}"
    result = Trainer(cfg, run_id=run_id).fit()  # its epoch log reaches Prefect (extra loggers)
    run = result.run_dir
    outputs = {name: artifact(run / name) for name in ("best.pt", "metrics.json", "history.parquet", "curves.png")}
    return _finish("train", config, inputs, outputs, {"run_dir": str(run), "best_epoch": result.metrics["best_epoch"]})


@_stage("evaluate")
def evaluate_stage(config: dict[str, Any], inputs: dict[str, Artifact], run_dir: str) -> StageResult:
    import time

    from diffcl.io import write_json_atomic
    from diffcl.trainer import load_run

    _, trainer = load_run(Path(run_dir))
    start = time.perf_counter()
    valid = trainer.evaluate("valid")
    seconds = time.perf_counter() - start
    test = trainer.evaluate("test")
    path = Path(run_dir) / "evaluation.json"
    write_json_atomic(path, {"valid": valid, "test": test, "eval_seconds": seconds})
    return _finish("evaluate", config, inputs, {"evaluation": artifact(path)}, {"valid": valid, "test": test})


@_stage("publish")
def publish_stage(config: dict[str, Any], inputs: dict[str, Artifact], run_dir: str, data_hash: str) -> StageResult:
    import json
    from dataclasses import asdict

    from diffcl.registry import Registry
    from diffcl.workspace import DatasetDirs

    cfg = load_config(config)
    evaluation = json.loads(Path(inputs["evaluation"]["path"]).read_text())
    registry = Registry(DatasetDirs.of(cfg.workspace, cfg.dataset.name).root / "registry.json")
    entry = {
        "model": cfg.model.name, "run_dir": run_dir, "valid": evaluation["valid"], "test": evaluation["test"],
        "config_sha256": base_key("train", config, {}), "data_sha256": data_hash,
    }
    decision = registry.register(entry, cfg.publish.metric, cfg.publish.promote_if)
    get_run_logger().info("registered v%d: %s (%s)", decision.version,
                          "promoted to production" if decision.promoted else "kept as challenger", decision.reason)
    # The registry file changes with every later version: nothing here to verify on a cache hit.
    return _finish("publish", config, inputs, {}, {"decision": asdict(decision)})


# --------------------------------------------------------------------------------------- flow
def _with_options(cfg: PipelineConfig):
    """Task options that depend on the config: result storage in the workspace, retries, timeouts."""
    o = cfg.orchestration
    storage = Path(cfg.workspace) / ".prefect-results"
    delays = [o.retry_delay_s * 2**i for i in range(max(o.network_retries, 1))]

    def options(t, network: bool = False, retries: int = 0):
        kwargs: dict[str, Any] = {"timeout_seconds": o.stage_timeout_s}
        if t is not fetch_stage:
            kwargs["result_storage"] = storage
        if network:
            kwargs.update(retries=o.network_retries, retry_delay_seconds=delays)
        elif retries:
            kwargs.update(retries=retries, retry_delay_seconds=0)
        return t.with_options(**kwargs)

    return options


@flow(name="diffcl", log_prints=True, validate_parameters=True)
def diffcl_flow(config: str = "configs/demo.yaml", overrides: list[str] | None = None) -> dict[str, Any]:
    """The whole pipeline for one dataset config (a YAML path) with ``key=value`` overrides."""
    from flows.reporting import publish_artifacts

    cfg = load_config(config, overrides or [])  # validated before any stage runs
    data = cfg.model_dump(mode="json")
    logger = get_run_logger()
    logger.info("diffcl pipeline for %s in %s", cfg.dataset.name, cfg.workspace)
    opt = _with_options(cfg)

    fetched = opt(fetch_stage, network=True)(data)
    prepared = opt(prepare_stage)(data, fetched["outputs"], fetched["info"]["manifests"])
    items = {"items": prepared["outputs"]["items"], "stats": prepared["outputs"]["stats"]}
    images = opt(images_stage, network=True)(data, items)
    text = opt(text_features_stage)(data, {**items, **_feature_file_inputs(cfg, "text")})
    image = opt(image_features_stage)(data, {**items, **images["outputs"], **_feature_file_inputs(cfg, "image")})
    features = {**text["outputs"], **image["outputs"]}
    shipped = shipped_features(cfg, prepared["info"]["stats"])
    for modality in feature_modalities(cfg, shipped):
        if modality not in ENCODED_MODALITIES:
            inputs = {**items, **_feature_file_inputs(cfg, modality)}
            features.update(opt(modality_features_stage)(data, inputs, modality)["outputs"])
    graphs = opt(graphs_stage)(data, {"interactions": prepared["outputs"]["interactions"], **features})
    trained = opt(train_stage, retries=1)(
        data, {"interactions": prepared["outputs"]["interactions"], **features, **graphs["outputs"]}
    )
    evaluated = opt(evaluate_stage)(data, {"best.pt": trained["outputs"]["best.pt"]}, trained["info"]["run_dir"])
    published = opt(publish_stage)(data, evaluated["outputs"], trained["info"]["run_dir"],
                                   prepared["outputs"]["interactions"]["sha256"])
    summary = {
        "dataset": cfg.dataset.name,
        "run_dir": trained["info"]["run_dir"],
        "valid": evaluated["info"]["valid"],
        "test": evaluated["info"]["test"],
        "decision": published["info"]["decision"],
        "stats": prepared["info"]["stats"],
        "config": dump_config(cfg),
    }
    publish_artifacts(cfg, summary)
    return summary
