"""The whole config (:class:`PipelineConfig`) and how it is read: YAML in, validated pydantic models
out. Unknown keys and bad values are errors that name the key (``dataset.kcore: Input should be
...``), and ``--set a.b=value`` overrides are applied to the raw mapping before validation, so they
are checked the same way. Relative paths are resolved against the working directory at load time,
so a config can be handed to another process (a Prefect worker) as absolute paths.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from diffcl.core.config.base import ConfigError, Strict
from diffcl.core.config.data import (
    DATASET_LOCATION_FIELDS,
    PRESET_NAMES,
    DatasetConfig,
    FetchConfig,
    PrepareConfig,
)
from diffcl.core.config.features import FeaturesConfig
from diffcl.core.config.model import GraphsConfig, ModelConfig
from diffcl.core.config.operations import OrchestrationConfig, PublishConfig
from diffcl.core.config.training import EvalConfig, TrainConfig
from diffcl.core.io import is_url
from diffcl.core.metrics import COLD_METRICS, METRICS


class PipelineConfig(Strict):
    """The whole pipeline: one dataset and the settings of every stage."""

    workspace: Path = Field(
        Path("./workspace"), description="where every stage writes; an fsspec URL (s3://bucket/prefix) "
        "stands for shared_workspace: that URL, with this machine's copy in /var/tmp/diffcl-workspaces/"
    )
    shared_workspace: str | None = Field(
        None, description="fsspec URL of a workspace shared by machines (s3://, gs://, file://); workspace is "
        "then this machine's copy of it, at the same path on every machine that runs tasks. Null: local only"
    )
    dataset: DatasetConfig
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    prepare: PrepareConfig = Field(default_factory=PrepareConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    graphs: GraphsConfig = Field(default_factory=GraphsConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)

    @model_validator(mode="before")
    @classmethod
    def _workspace_url(cls, data: Any) -> Any:
        """``workspace: s3://...`` is short for ``shared_workspace`` with the default local copy."""
        workspace = data.get("workspace") if isinstance(data, dict) else None
        if isinstance(workspace, str) and "://" in workspace:
            if data.get("shared_workspace") not in (None, workspace):
                raise ValueError("workspace is a URL and shared_workspace another one: give the URL as "
                                 "shared_workspace and a local path as workspace")
            from diffcl.core.shared import default_mirror

            data = {**data, "shared_workspace": workspace, "workspace": str(default_mirror(workspace))}
        return data

    @model_validator(mode="after")
    def _check_metrics(self) -> PipelineConfig:
        for key, metric in (("train.metric", self.train.metric), ("publish.metric", self.publish.metric)):
            name, _, k = metric.partition("@")
            # The cold-start metrics exist only where a split has new items: training checks both keys
            # against what the evaluator reports (Trainer.check_metric, pipeline.publish.check_publish_metric).
            if name not in METRICS + COLD_METRICS or not k.isdigit() or int(k) not in self.eval.topk:
                raise ValueError(
                    f"{key} {metric!r} must be {'|'.join(METRICS + COLD_METRICS)} @K with K in eval.topk {self.eval.topk}"
                )
        return self


# --------------------------------------------------------------------------------------------
# Loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value); the value is parsed as YAML (numbers, bools,
    null, lists) so that ``--set prepare.kcore=10`` gives an int."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for depth, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {'.'.join(keys[: depth + 1])} is a value, not a section"
                )
            node = child
        node[keys[-1]] = value
    return data


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = [f"invalid config {origin}:"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _resolve_paths(config: PipelineConfig) -> PipelineConfig:
    config.workspace = config.workspace.expanduser().resolve()
    ds = config.dataset
    for key in DATASET_LOCATION_FIELDS:
        value = getattr(ds, key)
        if value is not None and not is_url(value):
            setattr(ds, key, str(Path(value).expanduser().resolve()))
    files = config.features.files
    for name, value in files.items():
        files[name] = str(Path(value).expanduser().resolve())
    return config


def _read_text(path: Path, what: str = "config file") -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what.removesuffix(' file')} path {path} is a folder, not a YAML file") from None
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be read: {err.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError(f"{what} {path} is not UTF-8 text (line {line}: byte {raw[err.start]:#04x})") from None


def _read_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    try:
        data = yaml.safe_load(_read_text(path, what)) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping at the top level")
    return data


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` onto a copy of ``base``: sections merge key by key, values replace."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def overlay_overrides(overlay: dict[str, Any], prefix: str = "") -> list[str]:
    """The ``--set key=value`` list equivalent to merging ``overlay`` (values as YAML)."""
    items = []
    for key, value in overlay.items():
        if isinstance(value, dict) and value:
            items += overlay_overrides(value, f"{prefix}{key}.")
        else:
            text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000).strip()
            items.append(f"{prefix}{key}={text.removesuffix('...').strip()}")
    return items


def read_overlay(path: str | Path) -> dict[str, Any]:
    return _read_mapping(Path(path), "overlay file")


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None,
                overlays: Sequence[str | Path] = ()) -> PipelineConfig:
    """Read a YAML file (or a mapping), merge the overlay files onto it in order, apply
    ``key=value`` overrides, validate, resolve paths."""
    if isinstance(source, dict):
        data, origin = source, "(mapping)"
    elif not Path(source).exists() and str(source) in PRESET_NAMES:
        # A bare preset name stands for the published benchmark dataset with every default.
        data, origin = {"dataset": {"name": str(source), "preset": str(source)}}, f"preset {source}"
    else:
        path = Path(source)
        origin = str(path)
        data = _read_mapping(path)
    for overlay in overlays:
        data = deep_merge(data, read_overlay(overlay))
    if overlays:
        origin += f" with overlay {', '.join(str(o) for o in overlays)}"
    data = apply_overrides(data, overrides or [])
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, origin)) from None
    return _resolve_paths(config)


def dump_config(config: PipelineConfig) -> str:
    """The resolved config as YAML, for run folders and provenance."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
