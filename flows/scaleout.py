"""Feature shards as independent Prefect tasks, run by the configured task runner: threads of the
flow's process by default, or a Dask cluster (prefect-dask) when ``orchestration.task_runner`` is
``dask``. The work itself is :func:`pipeline.embed.encode_text_shard`, which knows nothing
of Prefect; the text features stage merges the shards' parts afterwards.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NONE

from diffcl.core.config import PipelineConfig, load_config
from diffcl.core.workspace import DatasetDirs
from flows.cache import pull, push
from pipeline.embed import encode_text_shard, text_shards


def task_runner(cfg: PipelineConfig):
    """The task runner ``orchestration.task_runner`` names."""
    o = cfg.orchestration
    if o.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError:
            raise RuntimeError("orchestration.task_runner: dask needs prefect-dask: pip install 'diffcl[scale]'") from None
        return DaskTaskRunner(address=o.dask_address) if o.dask_address else DaskTaskRunner()
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner()


# Not cached by Prefect: a shard is cheap to re-check (it encodes only texts missing from the cache).
@task(name="text_shard", cache_policy=NONE)
def text_shard_task(config: dict[str, Any], start: int, stop: int) -> int:
    """On a worker of another machine, with a shared workspace: the items down, the part up."""
    cfg = load_config(config)
    dirs = DatasetDirs.of(cfg.workspace, cfg.dataset.name)
    pull(config, dirs.prepared, dirs.features / "cache")
    encoded = encode_text_shard(cfg, start, stop)
    push(config, dirs.features / "cache")
    return encoded


@flow(name="text-shards", validate_parameters=False)
def text_shards_flow(config: dict[str, Any], shards: list[tuple[int, int]]) -> int:
    futures = text_shard_task.map(unmapped(config), [s for s, _ in shards], [e for _, e in shards])
    return sum(f.result() for f in futures)


def encode_text_shards(cfg: PipelineConfig) -> int:
    """Run the text shards (``features.shard_items``) on the configured task runner; the number of
    texts they encoded. Nothing to do with one shard: the text features stage encodes it itself."""
    shards = text_shards(cfg)
    if len(shards) <= 1:
        return 0
    return text_shards_flow.with_options(task_runner=task_runner(cfg))(cfg.model_dump(mode="json"), shards)
