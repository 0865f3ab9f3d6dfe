"""Prefect artifacts of a pipeline run: the metrics beside the champion's (on its own data and on
this run's), the dataset statistics, the training curves as a table (beside a link to the PNG),
and the training progress. Keys name the workspace and the dataset, so that two workspaces keep
two histories."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from diffcl.core.config import PipelineConfig
from diffcl.core.metrics import metric_names, reports_cold, reports_tail


def _slug(text: str) -> str:
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", text.lower())).strip("-")


def artifact_key(cfg: PipelineConfig, what: str) -> str:
    """``diffcl-<dataset>-<workspace folder>-<6 hex of its path>-<what>``: Prefect's keys allow
    lowercase letters, digits and dashes only; the hash tells apart workspaces of one name."""
    workspace = Path(cfg.workspace).resolve()
    digest = hashlib.sha256(str(workspace).encode()).hexdigest()[:6]
    return f"diffcl-{_slug(cfg.dataset.name)}-{_slug(workspace.name) or 'ws'}-{digest}-{what}"


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def metrics_markdown(summary: dict[str, Any], ks: list[int]) -> str:
    decision = summary["decision"]
    champion = decision.get("champion")
    rescored = decision.get("champion_on_this_data")
    head, rule = "| metric | valid | test |", "|---|---|---|"
    if champion:
        head += f" champion v{champion['version']} valid (its data) |"
        rule += "---|"
    if rescored:
        head += f" champion v{champion['version']} valid (this data) |"
        rule += "---|"
    rows = [head, rule]
    cold = any(reports_cold(summary.get(split) or {}) for split in ("valid", "test"))
    for name in metric_names(ks, tail=reports_tail(summary["valid"]), cold=cold):
        row = f"| {name} | {_number(summary['valid'].get(name))} | {_number(summary['test'].get(name))} |"
        if champion:
            row += f" {_number(champion['valid'].get(name))} |"
        if rescored:
            row += f" {_number(rescored.get(name))} |"
        rows.append(row)
    verdict = "promoted to production" if decision["promoted"] else "kept as challenger"
    return (f"# {summary['dataset']}: model v{decision['version']} {verdict}\n\n{decision['reason']}\n\n"
            + "\n".join(rows) + f"\n\nRun folder: `{summary['run_dir']}`\n")


def stats_markdown(stats: dict[str, Any]) -> str:
    keys = ["users", "items", "interactions", "train", "valid", "test", "density", "split", "kcore"]
    keys += [k for k in ("cold_start_users", "held_out_items") if stats.get(k)]
    rows = ["| statistic | value |", "|---|---|"] + [f"| {k} | {_number(stats.get(k))} |" for k in keys]
    return f"# {stats.get('dataset')}: dataset\n\n" + "\n".join(rows) + "\n"


def curve_rows(run_dir: Path, metric: str) -> list[dict[str, Any]]:
    """The training curves as table rows: epoch, loss parts, the validation metric, seconds."""
    import polars as pl

    history = pl.read_parquet(run_dir / "history.parquet")
    keep = [c for c in history.columns if not c.startswith("valid_") or c == f"valid_{metric}"]
    return [{k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
            for row in history.select(keep).iter_rows(named=True)]


def feature_notes(cfg: PipelineConfig) -> list[str]:
    """What the report must say about the features used, e.g. an untrained image encoder."""
    from diffcl.core.feature_files import available_features, read_metadata
    from diffcl.core.workspace import DatasetDirs

    notes = []
    for modality, path in available_features(DatasetDirs.of(cfg.workspace, cfg.dataset.name).features).items():
        meta = read_metadata(path)
        if meta.get("untrained"):
            notes.append(f"**Warning:** the {modality} {meta.get('note') or 'features come from an untrained encoder'}.")
    return notes


def publish_artifacts(cfg: PipelineConfig, summary: dict[str, Any]) -> None:
    notes = "\n\n".join(feature_notes(cfg))
    create_markdown_artifact(metrics_markdown(summary, cfg.eval.topk) + (f"\n{notes}\n" if notes else ""),
                             key=artifact_key(cfg, "metrics"), description="validation and test metrics beside the champion's")
    create_markdown_artifact(stats_markdown(summary["stats"]), key=artifact_key(cfg, "dataset"), description="dataset statistics")
    run_dir = Path(summary["run_dir"])
    create_table_artifact(curve_rows(run_dir, cfg.train.metric), key=artifact_key(cfg, "curves"),
                          description=f"loss and valid {cfg.train.metric} per epoch ({run_dir.name}/curves.png)")
    create_link_artifact((run_dir / "curves.png").resolve().as_uri(), link_text="training curves (PNG, on the machine that ran)",
                         key=artifact_key(cfg, "curves-png"), description="loss and validation metric per epoch")
