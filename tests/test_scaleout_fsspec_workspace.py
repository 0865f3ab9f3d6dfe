"""A workspace shared through an fsspec URL (diffcl.core.shared): what pull and push move, and the
lease that stands in for a flock on an object store; fsspec's memory and local filesystems."""

from __future__ import annotations

import json
import os
import threading
import time

import fsspec
import pytest

from diffcl.core.config import load_config
from diffcl.core.shared import LeaseBusy, SharedWorkspace, default_mirror


@pytest.fixture(params=["memory", "file"])
def url(request, tmp_path) -> str:
    if request.param == "memory":
        return f"memory://diffcl-test-{tmp_path.name}/shared"
    return f"file://{tmp_path}/shared"


def _machine(url: str, tmp_path, name: str) -> SharedWorkspace:
    return SharedWorkspace(url, tmp_path / name)


def test_fsspec_workspace_push_then_pull_on_another_machine(url, tmp_path):
    a, b = _machine(url, tmp_path, "a"), _machine(url, tmp_path, "b")
    (a.local / "demo/prepared").mkdir(parents=True)
    (a.local / "demo/prepared/items.parquet").write_bytes(b"items v1")
    (a.local / "demo/prepared/stats.json").write_text("{}")
    (a.local / "demo/prepared/.items.parquet.x.tmp").write_text("partial")  # a write in progress
    (a.local / "demo/prepared/registry.json.lock").write_text("123")  # this machine's flock file
    assert a.push("demo/prepared") == 2
    assert a.push("demo/prepared") == 0  # nothing changed since
    assert b.pull("demo/prepared") == 2 and b.pull("demo/prepared") == 0
    assert (b.local / "demo/prepared/items.parquet").read_bytes() == b"items v1"
    assert not (b.local / "demo/prepared/.items.parquet.x.tmp").exists()
    assert not (b.local / "demo/prepared/registry.json.lock").exists()
    fs, root = fsspec.core.url_to_fs(url)
    assert not [p for p in fs.find(root) if p.endswith(".part")]  # uploads moved onto their keys

    # b rewrites the file and pushes; a's untouched copy never goes back over it, and a pulls it.
    time.sleep(0.01)
    (b.local / "demo/prepared/items.parquet").write_bytes(b"items v2 longer")
    assert b.push("demo") == 1
    assert a.push("demo/prepared") == 0
    assert a.pull("demo/prepared/items.parquet") == 1
    assert (a.local / "demo/prepared/items.parquet").read_bytes() == b"items v2 longer"
    assert a.pull("demo/not-there") == 0 and a.push("demo/not-there") == 0

    # Globs; and a file deleted here after it was synced (a merged shard part) goes from the share.
    (b.local / "demo/features/cache/text.parts").mkdir(parents=True)
    (b.local / "demo/features/cache/text.parts/0-10.parquet").write_bytes(b"part")
    (b.local / "demo/features/cache/text-1a.parquet").write_bytes(b"cache")
    assert b.push("demo/features") == 2
    assert a.pull("demo/features/cache/*.parquet") == 1  # the cache file, not the parts folder
    # a (the features stage) merges b's part and deletes it: gone from the share, and b's next push
    # (b untouched its copy) does not bring it back.
    assert a.pull("demo/features/cache") == 1
    (a.local / "demo/features/cache/text.parts/0-10.parquet").unlink()
    assert a.push("demo/features/cache") == 1
    assert not fs.exists(f"{root}/demo/features/cache/text.parts/0-10.parquet")
    assert b.push("demo/features/cache") == 0
    assert not fs.exists(f"{root}/demo/features/cache/text.parts/0-10.parquet")
    assert fs.exists(f"{root}/demo/features/cache/text-1a.parquet")
    # A glob matching folders syncs the files inside them (a run folder and its -r1 sibling).
    for run in ("mf-1a", "mf-1a-r1", "mf-2b"):
        (b.local / f"demo/runs/{run}").mkdir(parents=True)
        (b.local / f"demo/runs/{run}/best.pt").write_bytes(run.encode())
    assert b.push("demo/runs/mf-1a*") == 2 and b.push("demo/runs/mf-1a*") == 0
    assert a.pull("demo/runs/mf-1a*") == 2 and (a.local / "demo/runs/mf-1a-r1/best.pt").read_bytes() == b"mf-1a-r1"
    assert not (a.local / "demo/runs/mf-2b").exists()

    # ... but not one that another machine changed after this one's last sync.
    (b.local / "demo/prepared/stats.json").write_text('{"newer": true}')
    assert b.push("demo/prepared") == 1
    (a.local / "demo/prepared/stats.json").unlink()
    assert a.push("demo/prepared") == 0 and fs.cat_file(f"{root}/demo/prepared/stats.json") == b'{"newer": true}'


def test_fsspec_workspace_url_in_config_is_the_shared_workspace(tmp_path):
    data = {"dataset": {"name": "d", "source": "tables", "interactions": str(tmp_path / "x.csv")}}
    short = load_config({**data, "workspace": "memory://bucket/ws"})
    assert short.shared_workspace == "memory://bucket/ws" and short.workspace == default_mirror("memory://bucket/ws")
    explicit = load_config({**data, "workspace": str(tmp_path / "copy"), "shared_workspace": "s3://b/p"})
    assert explicit.workspace == tmp_path / "copy" and explicit.shared_workspace == "s3://b/p"
    again = load_config(short.model_dump(mode="json"))  # how a task on another worker gets it
    assert again.workspace == short.workspace and again.shared_workspace == short.shared_workspace
    with pytest.raises(Exception, match="shared_workspace"):
        load_config({**data, "workspace": "memory://a", "shared_workspace": "memory://b"})


def test_fsspec_workspace_lease_is_exclusive_renewed_and_taken_over_when_expired(url, tmp_path):
    a, b = _machine(url, tmp_path, "a"), _machine(url, tmp_path, "b")
    # b waits longer than the ttl: the holder renews the lease meanwhile.
    with (a.lease(".pipeline.lock", ttl_s=0.6), pytest.raises(LeaseBusy, match="pid"),
          b.lease(".pipeline.lock", timeout_s=0.9, poll_s=0.1)):
        pass
    with b.lease(".pipeline.lock"):  # released: free at once
        pass

    # A holder that died (no renewals) leaves an expired lease: a waiter takes it over.
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/.pipeline.lock", json.dumps({"holder": "gone pid 1", "token": "t", "expires": time.time() - 1}).encode())
    taken = threading.Event()

    def take():
        with b.lease(".pipeline.lock", timeout_s=5):
            taken.set()

    worker = threading.Thread(target=take)
    worker.start()
    worker.join(10)
    assert taken.is_set() and not fs.exists(f"{root}/.pipeline.lock")

    # A holder that died between creating the lease and writing it leaves an empty one: taken over
    # once it stayed unreadable for a whole ttl, not before.
    fs.pipe_file(f"{root}/.pipeline.lock", b"")
    with pytest.raises(LeaseBusy, match="unknown holder"), b.lease(".pipeline.lock", timeout_s=0.2, ttl_s=5, poll_s=0.05):
        pass
    with b.lease(".pipeline.lock", timeout_s=5, ttl_s=0.3, poll_s=0.05):
        assert json.loads(fs.cat_file(f"{root}/.pipeline.lock"))["holder"].endswith(f"pid {os.getpid()}")


def test_fsspec_workspace_stage_commands_say_the_flow_syncs_it(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    config = tmp_path / "shared.yaml"
    config.write_text(f"workspace: memory://bucket/ws\ndataset: {{name: d, source: tables, interactions: {tmp_path}/x.csv}}\n")
    result = CliRunner().invoke(app, ["prepare", str(config)])
    assert result.exit_code == 2 and "synced by the flow" in result.output and "diffcl run" in result.output
