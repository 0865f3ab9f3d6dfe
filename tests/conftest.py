from __future__ import annotations

from pathlib import Path

import pytest

from tests.httpserver import LocalServer, start_server

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def http_server():
    state, server = start_server()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory) -> dict[str, Path]:
    """The synthetic demo dataset (2018 raw format, with images), written once per session."""
    from features.synthetic import DemoSpec, generate

    return generate(tmp_path_factory.mktemp("demo-source"), DemoSpec(users=200, items=120, groups=4))


def shared_data(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"real data not present: {path}")
    return path


__all__ = ["LocalServer", "shared_data"]


def _prepared_demo(root: Path, prepare_settings: dict | None = None):
    """Generate and prepare the default demo dataset under `root` (with ``prepare_settings`` as the
    config's prepare section); returns a function making configs on it."""
    from diffcl.core.config import load_config
    from features.synthetic import DemoSpec, generate
    from pipeline.prepare import prepare

    paths = generate(root / "source", DemoSpec())
    base = {
        "workspace": str(root / "ws"),
        "dataset": {"name": "demo", "source": "amazon2018", "reviews": str(paths["reviews"]), "meta": str(paths["meta"])},
        **({"prepare": prepare_settings} if prepare_settings else {}),
    }
    prepare(load_config(base), progress=False)

    def make(*overrides: str):
        return load_config(base, list(overrides))

    return make


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """The default demo dataset, prepared once, without features: returns a function making configs on it."""
    return _prepared_demo(tmp_path_factory.mktemp("demo-ws"))


@pytest.fixture(scope="session")
def demo_multimodal(tmp_path_factory):
    """The demo dataset in a workspace of its own (so `demo_workspace` stays feature-free whatever
    the test order), with planted-structure features written directly (no encoder needed):
    text and image vectors carry the item's latent group plus noise."""
    return _with_planted_features(_prepared_demo(tmp_path_factory.mktemp("demo-mm-ws")))


@pytest.fixture(scope="session")
def demo_cold_start(tmp_path_factory):
    """`demo_multimodal` with a fifth of the items held out of training (prepare.held_out_items):
    the cold-start protocol's data."""
    return _with_planted_features(_prepared_demo(tmp_path_factory.mktemp("demo-cold-ws"), {"held_out_items": 0.2}))


def _with_planted_features(make):
    """Text and image features carrying each item's latent group plus noise, and their kNN graphs."""
    import numpy as np
    import polars as pl

    from diffcl.core.feature_files import write_features
    from diffcl.core.workspace import DatasetDirs

    config = make()
    dirs = DatasetDirs.of(config.workspace, config.dataset.name)
    items = pl.read_parquet(dirs.prepared / "items.parquet")
    groups = items.get_column("categories").list.get(1).cast(pl.Categorical).to_physical().to_numpy()
    rng = np.random.default_rng(0)
    for modality, width in (("text", 24), ("image", 40)):
        centres = rng.normal(size=(groups.max() + 1, width))
        write_features(dirs.features / f"{modality}.parquet", centres[groups] + 0.5 * rng.normal(size=(len(groups), width)),
                       {"note": "synthetic planted-structure features for tests"})
    from pipeline.graphs import build_graphs

    build_graphs(config)
    return make
