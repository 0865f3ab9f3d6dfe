"""The deployments of the diffcl flow, one name per way of running it, so that neither overwrites
the other on the server:

- ``diffcl/full-pipeline``: ``diffcl serve CONFIG`` (this module), runs in the serving process;
- ``diffcl/full-pipeline-pool``: ``prefect deploy`` of ``prefect.yaml``, runs on a work pool's workers.

Both allow one run at a time (a deployment concurrency limit; further runs wait in the queue), and
the flow itself holds a workspace lock, which also covers runs of the other deployment.
"""

from __future__ import annotations

from pathlib import Path

from prefect.schedules import Cron

from diffcl.core.config import load_config
from flows.flow import diffcl_flow

DEPLOYMENT = "full-pipeline"
POOL_DEPLOYMENT = "full-pipeline-pool"  # the name in prefect.yaml
CONCURRENCY_LIMIT = 1


def build_deployment(config: str | Path, overrides: list[str] | None = None, cron: str | None = None,
                     timezone: str | None = None):
    """A RunnerDeployment for ``flow.serve`` / ``prefect.serve``; the config is validated now and
    passed as an absolute path, so that runs do not depend on the serving process's directory.
    The served ``overrides`` are their own parameter: a run's ``--param overrides=[...]`` is applied
    on top of them instead of replacing them."""
    path = Path(config).resolve() if Path(config).exists() else Path(config)  # or a preset name
    cfg = load_config(path, overrides or [])
    schedule = Cron(cron or cfg.orchestration.cron, timezone=timezone or cfg.orchestration.timezone)
    return diffcl_flow.to_deployment(
        name=DEPLOYMENT,
        schedules=[schedule],
        parameters={"config": str(path), "served_overrides": list(overrides or []), "overrides": []},
        concurrency_limit=CONCURRENCY_LIMIT,
        description=f"diffcl pipeline for dataset {cfg.dataset.name}: fetch, prepare, features, graphs, train, evaluate, publish",
        tags=["diffcl", cfg.dataset.name],
    )
