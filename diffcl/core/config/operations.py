"""Config of operations: the model registry (``publish``) and how the flow runs (``orchestration``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from diffcl.core.config.base import Strict


class PublishConfig(Strict):
    """The model registry: which trained model becomes the production model."""

    metric: str = Field("recall@20", description="validation metric that decides champion vs challenger")
    promote_if: Literal["at_least", "better"] = Field(
        "at_least", description="a challenger is promoted when its metric is at least (or strictly above) the champion's"
    )


class OrchestrationConfig(Strict):
    """How the Prefect flow runs the stages, and when the deployment runs."""

    cron: str = Field("0 3 * * 1", description="schedule of diffcl/full-pipeline (default: Mondays 03:00)")
    timezone: str = Field("UTC", description="time zone of the cron schedule")
    network_retries: int = Field(3, ge=0, description="reruns of the fetch stage after its per-request retries (fetch.retries) gave up on a transient failure")
    retry_delay_s: float = Field(10.0, ge=0, description="first retry delay; doubles each retry")
    stage_timeout_s: float = Field(6 * 3600, gt=0, description="any stage running longer than this fails")
    lock_wait_s: float = Field(
        0.0, ge=0, description="how long a flow run waits for another run of the same workspace to "
        "finish before it is skipped (one run per workspace at a time)"
    )
    task_runner: Literal["local", "dask"] = Field(
        "local", description="what runs the feature shards (features.shard_items): local: threads of the "
        "flow's process; dask: prefect-dask's DaskTaskRunner, on orchestration.dask_address or a local cluster"
    )
    dask_address: str | None = Field(
        None, description="scheduler of an existing Dask cluster (tcp://host:8786); none: a local cluster. "
        "Workers elsewhere need the workspace on a path or fsspec URL they all reach"
    )
