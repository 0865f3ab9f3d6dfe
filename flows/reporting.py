"""Prefect artifacts of a pipeline run: the metrics beside the previous production model's, the
dataset statistics, and a link to the training curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from diffcl.config import PipelineConfig

METRICS = [f"{m}@{k}" for k in (10, 20) for m in ("recall", "ndcg", "precision", "map", "hit")]


def _key(cfg: PipelineConfig, what: str) -> str:
    # Artifact keys: lowercase letters, digits and dashes only.
    name = "".join(c if c.isalnum() else "-" for c in cfg.dataset.name.lower())
    return f"diffcl-{name}-{what}"


def metrics_markdown(summary: dict[str, Any]) -> str:
    decision = summary["decision"]
    champion = decision.get("champion")
    head = "| metric | valid | test |" + (f" previous production v{champion['version']} (test) |" if champion else "")
    rule = "|---|---|---|" + ("---|" if champion else "")
    rows = [head, rule]
    for name in METRICS:
        row = f"| {name} | {summary['valid'][name]:.4f} | {summary['test'][name]:.4f} |"
        if champion:
            row += f" {champion['test'].get(name, float('nan')):.4f} |"
        rows.append(row)
    verdict = "promoted to production" if decision["promoted"] else "kept as challenger"
    return (f"# {summary['dataset']}: model v{decision['version']} {verdict}\n\n{decision['reason']}\n\n"
            + "\n".join(rows) + f"\n\nRun folder: `{summary['run_dir']}`\n")


def stats_markdown(stats: dict[str, Any]) -> str:
    keys = ["users", "items", "interactions", "train", "valid", "test", "density", "split", "kcore"]
    rows = ["| statistic | value |", "|---|---|"]
    rows += [f"| {k} | {stats[k]:,} |" if isinstance(stats.get(k), int) else f"| {k} | {stats.get(k)} |" for k in keys]
    return f"# {stats.get('dataset')}: dataset\n\n" + "\n".join(rows) + "\n"


def feature_notes(cfg: PipelineConfig) -> list[str]:
    """What the report must say about the features used, e.g. an untrained image encoder."""
    from diffcl.feature_store import available_features, read_metadata
    from diffcl.workspace import DatasetDirs

    notes = []
    for modality, path in available_features(DatasetDirs.of(cfg.workspace, cfg.dataset.name).features).items():
        meta = read_metadata(path)
        if meta.get("untrained"):
            notes.append(f"**Warning:** the {modality} {meta.get('note') or 'features come from an untrained encoder'}.")
    return notes


def publish_artifacts(cfg: PipelineConfig, summary: dict[str, Any]) -> None:
    notes = "\n\n".join(feature_notes(cfg))
    create_markdown_artifact(metrics_markdown(summary) + (f"\n{notes}\n" if notes else ""), key=_key(cfg, "metrics"),
                             description="test and validation metrics")
    create_markdown_artifact(stats_markdown(summary["stats"]), key=_key(cfg, "dataset"), description="dataset statistics")
    curves = Path(summary["run_dir"]) / "curves.png"
    create_link_artifact(curves.resolve().as_uri(), link_text="training curves (PNG)", key=_key(cfg, "curves"),
                         description="loss and validation metric per epoch")
