"""The deployment ``diffcl/full-pipeline``: the diffcl flow on a cron schedule."""

from __future__ import annotations

from pathlib import Path

from prefect.schedules import Cron

from diffcl.config import load_config
from flows.pipeline import diffcl_flow

DEPLOYMENT = "full-pipeline"


def build_deployment(config: str | Path, overrides: list[str] | None = None, cron: str | None = None,
                     timezone: str | None = None):
    """A RunnerDeployment for ``flow.serve`` / ``prefect.serve``; the config is validated now and
    passed as an absolute path, so that runs do not depend on the serving process's directory."""
    path = Path(config).resolve() if Path(config).exists() else Path(config)  # or a preset name
    cfg = load_config(path, overrides or [])
    schedule = Cron(cron or cfg.orchestration.cron, timezone=timezone or cfg.orchestration.timezone)
    return diffcl_flow.to_deployment(
        name=DEPLOYMENT,
        schedules=[schedule],
        parameters={"config": str(path), "overrides": list(overrides or [])},
        description=f"diffcl pipeline for dataset {cfg.dataset.name}: fetch, prepare, features, graphs, train, evaluate, publish",
        tags=["diffcl", cfg.dataset.name],
    )
