"""Operating the deployment without a Prefect server: the work-pool definition and its worker
check, the packaged demo config, `diffcl models` in 80 columns, the champion rule, cache keys
(issue 13; the flow-level checks are in test_flow.py, on its one test server)."""

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


def test_pool_deployment_has_its_own_name_and_the_served_parameters():
    from flows.deploy import CONCURRENCY_LIMIT, DEPLOYMENT, POOL_DEPLOYMENT

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (deployment,) = spec["deployments"]
    assert deployment["name"] == POOL_DEPLOYMENT != DEPLOYMENT
    assert set(deployment["parameters"]) == {"config", "served_overrides", "overrides"}
    assert deployment["concurrency_limit"] == CONCURRENCY_LIMIT
    assert (ROOT / deployment["entrypoint"].split(":")[0]).is_file()


def test_worker_pull_step_names_what_to_set(monkeypatch, tmp_path):
    from prefect.utilities.importtools import import_object

    from flows.worker import WorkerSetupError

    ((name, inputs),) = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"][0].items()
    step = import_object(name)  # as the worker resolves it
    monkeypatch.delenv("DIFFCL_HOME", raising=False)
    with pytest.raises(WorkerSetupError, match="DIFFCL_HOME is not set on this worker: export DIFFCL_HOME="):
        step(**inputs)
    monkeypatch.setenv("DIFFCL_HOME", str(tmp_path))
    with pytest.raises(WorkerSetupError, match="no flows/flow.py there"):
        step(**inputs)
    monkeypatch.setenv("DIFFCL_HOME", str(ROOT))
    monkeypatch.chdir(tmp_path)
    assert step(**inputs) == {"directory": str(ROOT)} and Path.cwd() == ROOT


def test_demo_runs_from_any_folder(monkeypatch, tmp_path):
    """Issue 13.11: the packaged demo config (identical to configs/demo.yaml) and its data under ./workspace."""
    import features.synthetic
    from diffcl.core.config import load_config
    from pipeline.demo import DEMO_CONFIG, ensure_demo_data, packaged_demo_config, resolve_config

    assert packaged_demo_config().read_text() == (ROOT / "configs/demo.yaml").read_text()
    monkeypatch.chdir(tmp_path)
    config = resolve_config(DEMO_CONFIG)
    assert config == str(packaged_demo_config())
    cfg = load_config(config)
    assert cfg.workspace == tmp_path / "workspace"
    small = features.synthetic.DemoSpec(users=120, items=60, groups=3)  # the default, smaller
    real = features.synthetic.generate
    monkeypatch.setattr(features.synthetic, "generate", lambda out: real(out, small))
    assert ensure_demo_data(cfg) and Path(cfg.dataset.reviews).is_file()
    assert not ensure_demo_data(cfg)  # present: written once
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/demo.yaml").write_text("x")
    assert resolve_config(DEMO_CONFIG) == DEMO_CONFIG  # a checkout's own config wins


def test_serve_without_a_config_serves_the_packaged_demo_from_any_folder(monkeypatch, tmp_path):
    import prefect

    from flows.cli import app
    from pipeline.demo import packaged_demo_config

    served = []
    monkeypatch.setattr(prefect, "serve", lambda *deployments: served.extend(deployments))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 0, result.output
    assert served[0].parameters["config"] == str(packaged_demo_config())


def test_models_table_fits_80_columns(tmp_path):
    from flows.cli import app

    config = tmp_path / "c.yaml"
    config.write_text(f"workspace: {tmp_path / 'ws'}\ndataset: {{name: demo, source: amazon2018, reviews: r.json.gz}}\n")
    metrics = {"recall@20": 0.12345678, "ndcg@20": 0.1}
    versions = [{"version": v, "model": "diffcl", "valid": metrics, "test": metrics, "promoted": True,
                 "registered_at": "2025-01-06T03:00:12+00:00", "run_dir": f"/x/runs/diffcl-20250106-030012-ab1{v}"}
                for v in (1, 2, 12)]
    registry = tmp_path / "ws/demo/registry.json"
    registry.parent.mkdir(parents=True)
    registry.write_text(json.dumps({"production": 12, "versions": versions}))
    result = CliRunner().invoke(app, ["models", str(config)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80, result.output
    assert "diffcl-20250106-030012-ab112" in result.output and "v12 *" in result.output and "0.1235" in result.output


def test_champion_on_other_data_is_rescored_or_the_documented_rule_applies(tmp_path):
    from pipeline.publish import Registry

    def entry(value, data):
        return {"model": "m", "run_dir": "r", "valid": {"recall@20": value}, "test": {"recall@20": value}, "data_sha256": data}

    registry = Registry(tmp_path / "registry.json")
    registry.register(entry(0.30, "a"), "recall@20")
    kept = registry.register(entry(0.25, "b"), "recall@20", rescore=lambda champion: ({"recall@20": 0.28}, ""))
    assert not kept.promoted and kept.champion_on_this_data == {"recall@20": 0.28} and "on this data" in kept.reason
    changed = registry.register(entry(0.10, "c"), "recall@20", rescore=lambda champion: (None, "its users or items differ"))
    assert changed.promoted and changed.data_changed and "its users or items differ" in changed.reason
    same = registry.register(entry(0.05, "c"), "recall@20", rescore=lambda champion: pytest.fail("same data: no rescore"))
    assert not same.promoted


def test_a_publish_metric_the_run_lacks_is_refused_and_a_champion_without_it_is_rescored(tmp_path):
    from pipeline.publish import PublishError, Registry

    def entry(valid):
        return {"model": "m", "run_dir": "r", "valid": valid, "test": valid, "data_sha256": "a"}

    registry = Registry(tmp_path / "registry.json")
    registry.register(entry({"recall@20": 0.30}), "recall@20")  # registered before cold metrics existed
    with pytest.raises(PublishError, match=r"publish.metric 'cold_recall@20' is not among the run's validation metrics \(recall@20\)"):
        registry.register(entry({"recall@20": 0.31}), "cold_recall@20")
    assert len(Registry(tmp_path / "registry.json").versions) == 1  # nothing registered
    cold = {"recall@20": 0.31, "cold_recall@20": 0.05}
    kept = registry.register(entry(cold), "cold_recall@20", rescore=lambda champion: ({**cold, "cold_recall@20": 0.07}, ""))
    assert not kept.promoted and "0.0500 < champion v1 0.0700" in kept.reason and "rescored" in kept.reason
    unscored = registry.register(entry(cold), "cold_recall@20", rescore=lambda champion: (None, "no weights"))
    assert unscored.promoted and "has no valid cold_recall@20" in unscored.reason and "no weights" in unscored.reason


def test_cache_keys_ignore_locations_and_where_training_runs():
    from diffcl.core.config import load_config
    from diffcl.training.run_folder import training_identity
    from flows.cache import Artifact, base_key

    def data(**dataset):
        return load_config({"dataset": {"name": "d", "source": "amazon2018", **dataset}}).model_dump(mode="json")

    here, there = data(reviews="/a/r.json.gz"), data(reviews="file:///b/r.json.gz")
    inputs = {"reviews": Artifact("/a/r.json.gz", "0" * 64)}
    assert base_key("prepare", here, inputs) == base_key("prepare", there, {"reviews": Artifact("/b", "0" * 64)})
    moved = {**here, "train": {**here["train"], "threads": 1, "device": "cpu"}, "orchestration": {**here["orchestration"], "stage_timeout_s": 5}}
    assert base_key("train", here, {}) == base_key("train", moved, {})
    assert training_identity(here) == training_identity(moved)
    assert base_key("train", here, {}) != base_key("train", {**here, "train": {**here["train"], "lr": 0.5}}, {})


def test_artifact_keys_name_workspace_and_dataset(tmp_path):
    import re

    from diffcl.core.config import load_config
    from flows.reporting import artifact_key

    def key(workspace):
        return artifact_key(load_config({"workspace": str(workspace), "dataset": {"name": "Baby_2014", "source": "amazon2014", "preset": "baby"}}), "metrics")

    a, b = key(tmp_path / "one" / "workspace"), key(tmp_path / "two" / "workspace")
    assert a != b and a.startswith("diffcl-baby-2014-workspace-") and all(re.fullmatch(r"[a-z0-9-]+", k) for k in (a, b))


def test_report_metric_names_follow_eval_topk():
    from diffcl.core.metrics import metric_names

    assert metric_names([5, 50]) == ["recall@5", "ndcg@5", "precision@5", "map@5", "hit@5",
                                     "recall@50", "ndcg@50", "precision@50", "map@50", "hit@50"]
    assert metric_names([5], tail=True)[-1] == "tail_recall@5"
    for path in ("flows/cli.py", "flows/reporting.py", "flows/flow.py"):
        assert "recall@10" not in (ROOT / path).read_text() and "recall@20" not in (ROOT / path).read_text(), path


def test_eval_topk_20_50_runs_through_train_report_and_models(demo_workspace, tmp_path):
    """Issue 12: cut-offs other than the defaults reach every table (no metric name is hard-coded)."""
    import yaml
    from typer.testing import CliRunner

    from diffcl.training.run import train
    from flows.cli import app, metrics_table
    from flows.reporting import metrics_markdown
    from pipeline.publish import Registry

    config = demo_workspace("model.name=mf", "train.epochs=2", "eval.topk=[20, 50]", "train.metric=recall@50",
                            "publish.metric=ndcg@50")
    result = train(config, run_id="topk-20-50")
    metrics = ("recall", "ndcg", "precision", "map", "hit", "tail_recall")  # tail_recall: eval.head_share's default 0.2
    assert set(result.metrics["test"]) == {f"{m}@{k}" for k in (20, 50) for m in metrics}
    rendered = CliRunner().invoke(app, ["evaluate", str(result.run_dir)]).output
    assert "recall@50" in rendered and "recall@10" not in rendered
    table = metrics_table(result.metrics)
    assert [c for c in table.columns[0].cells][:2] == ["recall@20", "ndcg@20"]
    decision = {"version": 1, "promoted": True, "reason": "first model"}
    markdown = metrics_markdown({"dataset": "demo", "decision": decision, "run_dir": str(result.run_dir),
                                 "valid": result.metrics["valid"], "test": result.metrics["test"]}, config.eval.topk)
    assert "| ndcg@50 |" in markdown and "| tail_recall@50 |" in markdown and "@10" not in markdown
    registry = Registry(config.workspace / "demo" / "registry.json")
    registry.register({"model": "mf", "run_dir": str(result.run_dir), "valid": result.metrics["valid"],
                       "test": result.metrics["test"], "config_sha256": "c", "data_sha256": "d", "id_tables": {}},
                      config.publish.metric, config.publish.promote_if)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    listed = CliRunner().invoke(app, ["models", str(path)])
    assert listed.exit_code == 0 and "ndcg@50" in listed.output, listed.output
