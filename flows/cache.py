"""Stage bookkeeping for the flow: cache keys and the ledger of verified outputs.

With a shared workspace (``shared_workspace``), :func:`pull` and :func:`push` move a stage's
inputs and outputs between it and this machine's copy, and the ledger lives in the shared workspace.

A stage's cache key is made of its code version, the config fields it reads and the content hashes
of its input files: never their paths or modification times. The ledger
(``<workspace>/<dataset>/.stages/<stage>.json``) records, per key, the hashes of the outputs the
stage wrote; a cache hit is only reported when those outputs still exist unchanged, otherwise the
key moves to a new generation and the stage runs again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec

import diffcl
from diffcl.core.config import (
    DATASET_LOCATION_FIELDS,
    RESULT_NEUTRAL_TRAIN_FIELDS,
    TRAINING_SECTIONS,
)
from diffcl.core.io import sha256_file, write_json_atomic
from diffcl.core.shared import shared_workspace
from diffcl.core.workspace import DatasetDirs
from pipeline.versions import STAGE_VERSIONS

log = logging.getLogger(__name__)

# The config fields each stage reads (dotted paths into the resolved config).
CONFIG_FIELDS = {
    "fetch": ["dataset", "fetch"],
    "prepare": ["dataset", "prepare"],
    "images": ["features.image"],
    "text_features": ["features.text", "features.precomputed", "features.files"],
    "image_features": ["features.image", "features.precomputed", "features.files"],
    "features": ["features.precomputed", "features.files"],  # any other modality, imported from a file
    "graphs": ["graphs"],
    "train": list(TRAINING_SECTIONS),  # what a run's resume check compares too
    "evaluate": ["eval"],
    "publish": ["publish"],
}

# Fields of a section left out of a stage's key: where the files are (their content is an input)
# and where training runs (it does not change the result).
EXCLUDED_FIELDS = {
    "prepare": {"dataset": DATASET_LOCATION_FIELDS},
    "train": {"train": RESULT_NEUTRAL_TRAIN_FIELDS},
}

@dataclass(frozen=True)
class Artifact:
    """A file a stage wrote or read, by content: tasks pass these, never DataFrames or tensors."""

    path: str
    sha256: str


def artifact(path: str | Path) -> Artifact:
    return Artifact(str(path), sha256_file(path))


@dataclass(frozen=True)
class CacheKey:
    """``<stage>-<base>-g<generation>``: ``base`` hashes what the stage reads (:func:`base_key`);
    the generation moves on when the outputs recorded under it are missing or altered."""

    stage: str
    base: str
    generation: int

    def __str__(self) -> str:
        return f"{self.stage}-{self.base}-g{self.generation}"

    @classmethod
    def parse(cls, text: str) -> CacheKey:
        stage, base, generation = text.rsplit("-", 2)
        return cls(stage, base, int(generation.removeprefix("g")))


@dataclass(frozen=True)
class StageResult:
    """What a stage task returns (and Prefect stores as JSON under its cache key)."""

    stage: str
    key: str  # str(CacheKey); empty for the uncached fetch stage
    outputs: dict[str, Artifact] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# Where Prefect stores the stages' results, under the workspace (or the shared workspace's root).
RESULTS_FOLDER = ".prefect-results"
_STAGE_RESULT_CLASS = f"{StageResult.__module__}.{StageResult.__qualname__}"


def screen_stored_result(config: dict[str, Any], key: str) -> bool:
    """Prefect reads a stored result back with the serializer that the stored file itself names,
    so a record naming pickle (planted, or left by a version that pickled) would be unpickled on
    a cache hit and could run code; a JSON one could name other classes or decoders to import.
    Before Prefect looks ``key`` up, a record under it that is not exactly what a stage writes
    (JSON, Prefect's JSON decoder, a StageResult naming no other class) is moved aside to
    ``<key>.refused``, so the stage runs again. Returns whether a record was refused."""
    fs, folder = results_folder(config)
    path = f"{folder}/{key}"
    try:
        content = fs.cat_file(path)
    except FileNotFoundError:
        return False
    if _is_stage_record(content):
        return False
    fs.mv(path, f"{path}.refused")
    log.warning("refused the stored result %s: not a JSON stage result (kept as %s.refused); the stage runs again",
                path, path)
    return True


def results_folder(config: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, folder) where Prefect keeps the stages' results: under the workspace, or under
    the shared workspace's root when there is one (a config or its JSON dump)."""
    if (shared := shared_workspace(config)) is not None:
        return shared.fs, f"{shared.root}/{RESULTS_FOLDER}"
    workspace = config["workspace"] if isinstance(config, dict) else config.workspace
    return fsspec.filesystem("file"), str(Path(workspace) / RESULTS_FOLDER)


def _is_stage_record(content: bytes) -> bool:
    from prefect.serializers import JSONSerializer

    try:
        record = json.loads(content)
        serializer, result = record["metadata"]["serializer"], json.loads(record["result"])
    except (ValueError, KeyError, TypeError):
        return False
    return (serializer == JSONSerializer().model_dump(mode="json") and isinstance(result, dict)
            and set(result) == {"__class__", "data"} and result["__class__"] == _STAGE_RESULT_CLASS
            and not _names_a_class(result["data"]))


def _names_a_class(value: Any) -> bool:
    """Whether a decoded JSON value holds a dunder key: Prefect's decoder imports what ``__class__``
    and ``__exc_type__`` name (a stage result's data has neither)."""
    if isinstance(value, dict):
        return any(key.startswith("__") for key in value) or any(_names_a_class(v) for v in value.values())
    if isinstance(value, list):
        return any(_names_a_class(v) for v in value)
    return False


def _select(config: dict[str, Any], dotted: str, stage: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = node[part]
    excluded = EXCLUDED_FIELDS.get(stage, {}).get(dotted, ())
    return {k: v for k, v in node.items() if k not in excluded} if excluded else node


def base_key(stage: str, config: dict[str, Any], inputs: dict[str, Artifact], modality: str | None = None) -> str:
    """``modality`` names the modality of the one stage that serves several (``features``)."""
    payload = {
        "stage": stage,
        "version": STAGE_VERSIONS[stage],
        "package": diffcl.__version__,
        "dataset": config["dataset"]["name"],
        "config": {field: _select(config, field, stage) for field in CONFIG_FIELDS[stage]},
        "inputs": {name: a.sha256 for name, a in sorted(inputs.items())},
        **({"modality": modality} if modality is not None else {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _relative(config: dict[str, Any], items) -> list[str]:
    """Workspace-relative paths of files, folders or Artifacts; those outside the workspace (a local
    source read in place) are not the shared workspace's to sync."""
    root = Path(config["workspace"]).resolve()
    rels = []
    for item in items:
        path = Path(item.path if isinstance(item, Artifact) else item).resolve()
        if path.is_relative_to(root):
            rels.append(path.relative_to(root).as_posix())
    return rels


def dataset_dirs(config: dict[str, Any]) -> DatasetDirs:
    """The dataset's folders, from a task's config (its JSON dump)."""
    return DatasetDirs.of(config["workspace"], config["dataset"]["name"])


def is_shared(config: dict[str, Any]) -> bool:
    """Whether the workspace is shared: what only a sync needs is computed only then."""
    return bool(config.get("shared_workspace"))


def model_inputs(config: dict[str, Any]) -> list[Path]:
    """What building a model reads (training, evaluating, rescoring a champion): the prepared
    tables, the feature files and the kNN graphs with their provenance sidecars."""
    dirs = dataset_dirs(config)
    return [dirs.prepared, dirs.features / "*.parquet", dirs.graphs]


def pull(config: dict[str, Any], *items) -> None:
    """Bring a stage's inputs down from the shared workspace (:mod:`diffcl.core.shared`), if any."""
    if (shared := shared_workspace(config)) is not None:
        shared.pull(*_relative(config, items))


def push(config: dict[str, Any], *items) -> None:
    """Send a stage's outputs up to the shared workspace, if any."""
    if (shared := shared_workspace(config)) is not None:
        shared.push(*_relative(config, items))


class Ledger:
    def __init__(self, config: dict[str, Any], stage: str):
        self.path = dataset_dirs(config).root / ".stages" / f"{stage}.json"
        self.config, self.stage = config, stage

    def _read(self) -> dict[str, Any]:
        pull(self.config, self.path)
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def key(self, base: str) -> CacheKey:
        """The generation moves on when the recorded outputs of the current one are missing or
        altered, so that Prefect's cached result is not reused. Without a record (a first run, or
        a dataset folder deleted with its ledger while Prefect's results stayed) the generation is
        new, so a result cached for files that are gone is never taken."""
        entry = self._read().get(base)
        if entry is None:
            return CacheKey(self.stage, base, time.time_ns())
        generation = entry["generation"]
        pull(self.config, *(a["path"] for a in entry["outputs"].values()))
        if not outputs_intact(entry["outputs"]):
            generation += 1
        return CacheKey(self.stage, base, generation)

    def record(self, key: CacheKey, outputs: dict[str, Artifact]) -> None:
        data = self._read()
        data[key.base] = {"generation": key.generation,
                          "outputs": {name: {"path": a.path, "sha256": a.sha256} for name, a in outputs.items()}}
        write_json_atomic(self.path, data)
        push(self.config, self.path)


def outputs_intact(outputs: dict[str, dict[str, str]]) -> bool:
    """The ledger's record of outputs (plain JSON: path and sha256 each) still on disk unchanged."""
    for a in outputs.values():
        path = Path(a["path"])
        if not path.exists() or sha256_file(path) != a["sha256"]:
            return False
    return True

