"""Run integrity (issue 10): checkpoints that cannot run code, run ids that are names and never
collide, locks on run folders and the registry, runs refused on changed data, image decompression
bombs, and `recommend --k` bounds."""

from __future__ import annotations

import io
import json
import multiprocessing
import pickle
import re
import struct
import zlib
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from diffcl.core.locks import LockBusy, exclusive_lock
from diffcl.training.errors import TrainError
from diffcl.training.run import build_run, load_model, train
from flows.cli import app
from pipeline.publish import Registry, RegistryBusy
from tests.payloads import CreatesFile

runner = CliRunner()
QUICK = ["model.name=mf", "train.epochs=2", "train.batch_size=512", "train.threads=2"]


def _config_file(config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return path


# ------------------------------------------------------------------ 1. checkpoints run no code
def _plant(path: Path, marker: Path) -> None:
    torch.save({"model": {}, "epoch": 1, "payload": CreatesFile(marker)}, path)


def test_planted_payload_is_real(tmp_path):
    # Guard for the tests below: unpickled by a full unpickler (as main loaded last.pt), the
    # payload does create its file.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(CreatesFile(marker)))
    assert marker.exists()


def test_resume_refuses_a_checkpoint_that_would_run_code(demo_workspace, tmp_path):
    config = demo_workspace(*QUICK)
    path = _config_file(config, tmp_path / "c.yaml")
    result = runner.invoke(app, ["train", str(path), "--run-id", "planted"])
    assert result.exit_code == 0, result.output
    marker = tmp_path / "pwned"
    _plant(config.workspace / "demo" / "runs" / "planted" / "last.pt", marker)

    result = runner.invoke(app, ["train", str(path), "--run-id", "planted"])
    assert result.exit_code == 2, result.output
    assert "last.pt: not a diffcl checkpoint of tensors and plain values, refused (Unsupported global: GLOBAL io.open)" in result.output
    assert "weights_only" not in result.output  # torch's advice to load it unsafely is not passed on
    assert "Traceback" not in result.output
    assert not marker.exists()
    with pytest.raises(TrainError, match="refused"):
        build_run(config, run_id="planted").fit()
    assert not marker.exists()


def test_checkpoints_hold_only_tensors_and_plain_values(demo_workspace):
    result = train(demo_workspace(*QUICK), run_id="plain")
    state = torch.load(result.run_dir / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and "config" not in state and "history" not in state
    assert isinstance(state["sampler_rng"]["state"]["state"], int)  # numpy PCG64 state: ints round-trip
    history = json.loads((result.run_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert json.loads((result.run_dir / "run.json").read_text())["data_hash"] == result.metrics["data_hash"]
    source = Path(__file__).resolve().parents[1]
    unsafe = re.compile(r"weights_only\s*=\s*False")
    offenders = [p for folder in ("diffcl", "features", "flows", "tests", "benchmarks") for p in (source / folder).rglob("*.py")
                 if unsafe.search(p.read_text())]
    assert offenders == []


def test_resume_drops_a_history_row_written_after_the_last_checkpoint(demo_workspace):
    # Killed between writing history.json and last.pt: history is one epoch ahead.
    config = demo_workspace(*QUICK)
    full = train(config, run_id="ahead")
    assert len(json.loads((full.run_dir / "history.json").read_text())) == 2
    torch.save({**torch.load(full.run_dir / "last.pt", weights_only=True), "epoch": 1}, full.run_dir / "last.pt")
    trainer = build_run(config, run_id="ahead")
    trainer._create_run_dir()
    assert trainer._resume() and [row["epoch"] for row in trainer.history] == [1]


# ------------------------------------------------------------------ 3. run ids are names
@pytest.mark.parametrize("bad", ["../../../x", "..", ".", "a/b", "", ".hidden", "-flag", "x" * 129, "a b"])
def test_run_ids_that_are_not_names_are_refused(demo_workspace, bad):
    with pytest.raises(TrainError, match="invalid run id"):
        build_run(demo_workspace(*QUICK), run_id=bad)


def test_cli_refuses_a_path_as_run_id_and_writes_nothing(demo_workspace, tmp_path):
    config = demo_workspace(*QUICK)
    path = _config_file(config, tmp_path / "c.yaml")
    result = runner.invoke(app, ["train", str(path), "--run-id", "../../../escaped"])
    assert result.exit_code == 2
    assert "invalid run id '../../../escaped'" in result.output
    runs = config.workspace / "demo" / "runs"
    assert not (runs / "../../../escaped").resolve().exists()


# ------------------------------------------------------------------ 4. unique ids, locks
def test_trainers_started_together_get_their_own_run_folders(demo_workspace):
    a, b = build_run(demo_workspace(*QUICK)), build_run(demo_workspace(*QUICK))
    assert a.run_dir != b.run_dir
    assert a.run_id.startswith("mf-") and len(a.run_id.split("-")) == 4


def test_a_generated_id_taken_meanwhile_is_never_shared(demo_workspace, monkeypatch):
    import diffcl.training.run as run_module
    import diffcl.training.run_folder as run_folder_module

    ids = iter(["mf-same", "mf-same", "mf-other"])
    for module in (run_module, run_folder_module):
        monkeypatch.setattr(module, "new_run_id", lambda prefix: next(ids))
    first, second = build_run(demo_workspace(*QUICK)), build_run(demo_workspace(*QUICK))
    first._create_run_dir()
    second._create_run_dir()
    assert (first.run_id, second.run_id) == ("mf-same", "mf-other")


def test_a_run_being_trained_cannot_be_trained_by_another(demo_workspace):
    import os

    config = demo_workspace(*QUICK)
    run_dir = config.workspace / "demo" / "runs" / "busy"
    busy = rf"run busy is being trained by another process \(pid {os.getpid()}\)"
    with exclusive_lock(run_dir / ".lock"), pytest.raises(TrainError, match=busy):
        build_run(config, run_id="busy").fit()
    assert not (run_dir / "last.pt").exists()
    assert train(config, run_id="busy").metrics["epochs"] == 2  # free again once released


def test_a_held_lock_refuses_a_second_holder(tmp_path):
    with exclusive_lock(tmp_path / ".lock"), pytest.raises(LockBusy), exclusive_lock(tmp_path / ".lock"):
        pass
    with exclusive_lock(tmp_path / ".lock"):
        pass  # released on exit


def _register_many(path: str, count: int) -> None:
    for i in range(count):
        Registry(Path(path)).register({"model": "mf", "run_dir": f"r{i}", "valid": {"recall@20": 0.1}}, "recall@20")


def test_concurrent_registrations_are_all_kept(tmp_path):
    path = tmp_path / "registry.json"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_register_many, args=(str(path), 15)) for _ in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert all(w.exitcode == 0 for w in workers)
    versions = [v["version"] for v in json.loads(path.read_text())["versions"]]
    assert sorted(versions) == list(range(1, 46))


def test_registry_reports_a_stuck_writer(tmp_path, monkeypatch):
    import pipeline.publish as registry_module

    monkeypatch.setattr(registry_module, "LOCK_TIMEOUT_S", 0.1)
    path = tmp_path / "registry.json"
    with exclusive_lock(tmp_path / "registry.json.lock"), pytest.raises(RegistryBusy, match="being updated by another process"):
        Registry(path).register({"valid": {"recall@20": 0.1}}, "recall@20")


# ------------------------------------------------------------------ 8. runs on changed data
@pytest.fixture
def reprepared_run(tmp_path):
    """A run trained on one dataset, whose prepared data was then rebuilt from another."""
    from diffcl.core.config import load_config
    from features.synthetic import DemoSpec, generate
    from pipeline.prepare import prepare

    def make(seed: int, items: int):
        paths = generate(tmp_path / f"source-{seed}", DemoSpec(users=120, items=items, groups=3, seed=seed))
        return load_config({"workspace": str(tmp_path / "ws"), "dataset": {
            "name": "demo", "source": "amazon2018", "reviews": str(paths["reviews"]), "meta": str(paths["meta"])}}, QUICK)

    first = make(1, 80)
    prepare(first, progress=False)
    result = train(first, run_id="old")
    second = make(2, 90)
    prepare(second, progress=False)
    return result.run_dir, second


def test_evaluate_and_recommend_after_reprepare_say_to_retrain(reprepared_run, tmp_path):
    run_dir, config = reprepared_run
    with pytest.raises(TrainError, match="prepared data changed since this run was trained"):
        load_model(run_dir)
    with pytest.raises(TrainError, match="does not fit the current data"):  # as a champion rescored on it
        load_model(run_dir, same_data=False)
    for args in (["evaluate", str(run_dir)], ["recommend", str(run_dir), "--user", "0"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "the prepared data changed since this run was trained" in result.output
        assert "diffcl train CONFIG" in result.output and "size mismatch" not in result.output
    from diffcl.core.config import dump_config

    path = _config_file(config, tmp_path / "c.yaml")
    (run_dir / "config.yaml").write_text(dump_config(config))  # the same config: only the data differs
    result = runner.invoke(app, ["train", str(path), "--run-id", "old"])
    assert result.exit_code == 2 and "prepared data changed" in result.output


# ------------------------------------------------------------------ 12. recommend --k
def test_recommend_k_bounds(demo_workspace, tmp_path):
    config = demo_workspace(*QUICK)
    run_dir = train(config, run_id="topk").run_dir
    result = runner.invoke(app, ["recommend", str(run_dir), "--user", "ADEMOUSER00003", "--k", "0"])
    assert result.exit_code == 2 and "--k must be at least 1 (got 0)" in result.output
    result = runner.invoke(app, ["recommend", str(run_dir), "--user", "ADEMOUSER00003", "--k", "-3"])
    assert result.exit_code == 2 and "--k must be at least 1 (got -3)" in result.output

    import polars as pl

    loaded = load_model(run_dir)
    users = pl.read_parquet(loaded.dirs.prepared / "users.parquet")
    uid = int(users.filter(pl.col("user_id") == "ADEMOUSER00003").get_column("user")[0])
    seen = (loaded.data.train + loaded.data.valid).tocsr()[uid].indices.tolist()
    items = pl.read_parquet(loaded.dirs.prepared / "items.parquet")
    unseen_ids = set(items.filter(~pl.col("item").is_in(seen)).get_column("item_id"))
    result = runner.invoke(app, ["recommend", str(run_dir), "--user", "ADEMOUSER00003", "--k", "100000"])
    assert result.exit_code == 0, result.output
    assert "-inf" not in result.output
    shown = re.findall(r"B0DEMO\d{4}", result.output)
    assert len(shown) == len(unseen_ids) and set(shown) == unseen_ids


# ------------------------------------------------------------------ 2. decompression bombs
def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares ``width`` x ``height`` RGB pixels (about 100 bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _real_png(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 10, 10)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("width, height", [(30000, 30000), (9000, 9000)])  # above / below Pillow's own limit
def test_a_decompression_bomb_is_recorded_missing(tmp_path, width, height):
    from features.image_download import DownloadSettings, fetch_images

    bomb = _png_declaring(width, height)
    assert len(bomb) < 200
    (tmp_path / "bomb.png").write_bytes(bomb)
    (tmp_path / "fine.png").write_bytes(_real_png(8))
    urls = [(tmp_path / "bomb.png").as_uri(), (tmp_path / "fine.png").as_uri()]
    bomb_result, fine = fetch_images(urls, tmp_path / "cache", DownloadSettings(), progress=False)
    assert bomb_result.status == "missing" and bomb_result.reason.startswith("too many pixels")
    assert fine.status == "ok"


def test_pixel_cap_is_configurable_and_applies_to_cached_images(tmp_path):
    from diffcl.core.config import ImageFeaturesConfig
    from features.image_download import DownloadSettings, fetch_images

    assert ImageFeaturesConfig().max_pixels == DownloadSettings().max_pixels == 40_000_000
    (tmp_path / "a.png").write_bytes(_real_png(100))
    url = (tmp_path / "a.png").as_uri()
    [cached] = fetch_images([url], tmp_path / "cache", DownloadSettings(), progress=False)
    assert cached.status == "ok"
    [capped] = fetch_images([url], tmp_path / "cache", DownloadSettings(max_pixels=5000), progress=False,
                            known={url: cached})
    assert capped.status == "missing" and capped.reason == "too many pixels (100x100 = 10,000 > 5,000; decompression bomb?)"


def test_encoder_refuses_to_decode_a_bomb_with_a_clear_error(tmp_path):
    from features.image_encoder import _ImageFiles

    (tmp_path / "bomb.img").write_bytes(_png_declaring(30000, 30000))
    (tmp_path / "big.img").write_bytes(_real_png(100))
    files = _ImageFiles([str(tmp_path / "bomb.img"), str(tmp_path / "big.img")], lambda img: img, max_pixels=5000)
    for i in range(2):
        with pytest.raises(ValueError, match=r"\.img: not encoded, .*(too many pixels|decompression bomb)"):
            files[i]
