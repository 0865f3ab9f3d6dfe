"""Stage bookkeeping for the flow: cache keys and the ledger of verified outputs.

A stage's cache key is made of its code version, the config fields it reads and the content hashes
of its input files: never their paths or modification times. The ledger
(``<workspace>/<dataset>/.stages/<stage>.json``) records, per key, the hashes of the outputs the
stage wrote; a cache hit is only reported when those outputs still exist unchanged, otherwise the
key moves to a new generation and the stage runs again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import diffcl
from diffcl.core.config import (
    DATASET_LOCATION_FIELDS,
    RESULT_NEUTRAL_TRAIN_FIELDS,
    TRAINING_SECTIONS,
)
from diffcl.core.io import sha256_file, write_json_atomic

# Bump a stage's number when its outputs change for the same inputs and config.
STAGE_VERSIONS = {
    "fetch": 1, "prepare": 2, "images": 1, "text_features": 1, "image_features": 1, "features": 1,
    "graphs": 2, "train": 1, "evaluate": 1, "publish": 1,
}
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

Artifact = dict[str, str]  # {"path": ..., "sha256": ...}


def artifact(path: str | Path) -> Artifact:
    return {"path": str(path), "sha256": sha256_file(path)}


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
        "inputs": {name: a["sha256"] for name, a in sorted(inputs.items())},
        **({"modality": modality} if modality is not None else {}),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


class Ledger:
    def __init__(self, config: dict[str, Any], stage: str):
        self.path = Path(config["workspace"]) / config["dataset"]["name"] / ".stages" / f"{stage}.json"
        self.stage = stage

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def key(self, base: str) -> str:
        """``<stage>-<base>-g<generation>``: the generation moves on when the recorded outputs of
        the current one are missing or altered, so that Prefect's cached result is not reused."""
        entry = self._read().get(base)
        if entry is None:
            return f"{self.stage}-{base}-g0"
        generation = entry["generation"]
        if not outputs_intact(entry["outputs"]):
            generation += 1
        return f"{self.stage}-{base}-g{generation}"

    def record(self, key: str, outputs: dict[str, Artifact]) -> None:
        _, base, generation = key.rsplit("-", 2)
        data = self._read()
        data[base] = {"generation": int(generation[1:]), "outputs": outputs}
        write_json_atomic(self.path, data)


def outputs_intact(outputs: dict[str, Artifact]) -> bool:
    for a in outputs.values():
        path = Path(a["path"])
        if not path.exists() or sha256_file(path) != a["sha256"]:
            return False
    return True
