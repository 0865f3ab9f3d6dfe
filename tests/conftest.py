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


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """The default demo dataset, prepared once: returns a function making configs on it."""
    from diffcl.config import load_config
    from features.prepare import prepare
    from features.synthetic import DemoSpec, generate

    root = tmp_path_factory.mktemp("demo-ws")
    paths = generate(root / "source", DemoSpec())
    base = {
        "workspace": str(root / "ws"),
        "dataset": {"name": "demo", "source": "amazon2018", "reviews": str(paths["reviews"]), "meta": str(paths["meta"])},
    }
    prepare(load_config(base), progress=False)

    def make(*overrides: str):
        return load_config(base, list(overrides))

    return make
