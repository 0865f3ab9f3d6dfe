"""Feature shards as independent Prefect tasks, run by the configured task runner: threads of the
flow's process by default, or a Dask cluster (prefect-dask) when ``orchestration.task_runner`` is
``dask``. The work itself is :func:`pipeline.embed.encode_shard` (text or image), which knows
nothing of Prefect; the modality's features stage merges the shards' parts afterwards.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, task, unmapped
from prefect.cache_policies import NONE

from diffcl.core.config import PipelineConfig, load_config
from flows.cache import dataset_dirs, is_shared, pull, push
from pipeline.embed import encode_shard, images_to_encode, modality_shards


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


# Not cached by Prefect: a shard is cheap to re-check (it encodes only what the cache lacks).
@task(name="feature_shard", cache_policy=NONE)
def shard_task(config: dict[str, Any], modality: str, start: int, stop: int) -> int:
    """On a worker of another machine, with a shared workspace: the inputs down, the part up."""
    cfg = load_config(config)
    dirs = dataset_dirs(config)
    # What this shard reads, no more: the items, the cache (not other shards' parts), its uncached images.
    cache_files = [dirs.features / "cache" / pattern for pattern in ("*.parquet", "*.json")]  # not *.parts/
    pull(config, dirs.prepared / "items.parquet", dirs.prepared / "stats.json", *cache_files)
    if modality == "image" and is_shared(config):
        pull(config, dirs.features / "image_sources.parquet")
        pull(config, *images_to_encode(cfg, start, stop))
    encoded = encode_shard(cfg, modality, start, stop)
    push(config, dirs.features / "cache")
    return encoded


@flow(name="feature-shards", validate_parameters=False)
def shards_flow(config: dict[str, Any], modality: str, shards: list[tuple[int, int]]) -> int:
    futures = shard_task.map(unmapped(config), unmapped(modality), [s for s, _ in shards], [e for _, e in shards])
    return sum(f.result() for f in futures)


def encode_shards(cfg: PipelineConfig, modality: str) -> int:
    """Run a modality's shards (``features.shard_items``) on the configured task runner; the number
    of texts or images they encoded. Nothing to do with one shard: the features stage encodes it."""
    shards = modality_shards(cfg, modality)
    if len(shards) <= 1:
        return 0
    return shards_flow.with_options(task_runner=task_runner(cfg))(cfg.model_dump(mode="json"), modality, shards)
