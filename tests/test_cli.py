import json
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_demo_data_then_prepare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["demo-data", "src", "--users", "120", "--items", "60", "--groups", "3"])
    assert result.exit_code == 0, result.output
    (tmp_path / "c.yaml").write_text(
        "workspace: ws\ndataset:\n  name: demo\n  source: amazon2018\n"
        "  reviews: src/Demo_5.json.gz\n  meta: src/meta_Demo.json.gz\n"
    )
    result = runner.invoke(app, ["prepare", "c.yaml", "--set", "prepare.split=chronological"])
    assert result.exit_code == 0, result.output
    assert "users" in result.output and "chronological split" in result.output
    stats = json.loads((tmp_path / "ws/demo/prepared/stats.json").read_text())
    assert stats["users"] == 120 and stats["split"] == "chronological"


def test_bad_config_exits_with_a_message_naming_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset:\n  name: x\n  source: tables\n  interactions: i.csv\n  colums: {}\n")
    result = runner.invoke(app, ["prepare", str(path)])
    assert result.exit_code == 2
    assert "dataset.colums: unknown key" in result.output


def test_data_error_exits_cleanly(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(f"workspace: {tmp_path}\ndataset:\n  name: x\n  source: tables\n  interactions: {tmp_path}/none.csv\n")
    result = runner.invoke(app, ["prepare", str(path)])
    assert result.exit_code == 2
    assert f"dataset.interactions: file not found: {tmp_path}/none.csv" in result.output and "Traceback" not in result.output


def test_train_evaluate_recommend(demo_workspace, tmp_path):
    import yaml

    config = demo_workspace()
    path = tmp_path / "demo.yaml"
    data = config.model_dump(mode="json")
    path.write_text(yaml.safe_dump(data))
    result = runner.invoke(app, ["train", str(path), "--set", "train.epochs=2", "--set", "train.batch_size=512",
                                 "--set", "model.name=mf", "--run-id", "cli"])
    assert result.exit_code == 0, result.output
    assert "recall@20" in result.output and "test" in result.output
    run_dir = config.workspace / "demo" / "runs" / "cli"
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "valid" in result.output
    result = runner.invoke(app, ["recommend", str(run_dir), "--user", "ADEMOUSER00003", "--k", "5"])
    assert result.exit_code == 0, result.output
    assert result.output.count("B0DEMO") == 5
    result = runner.invoke(app, ["recommend", str(run_dir), "--user", "nobody"])
    assert result.exit_code == 2 and "unknown user 'nobody'" in result.output


def test_graphs_command_skips_missing_modalities(demo_workspace, tmp_path):
    import yaml

    config = demo_workspace()
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    result = runner.invoke(app, ["graphs", str(path)])
    assert result.exit_code == 0, result.output
    assert "no modality features: no kNN graph to build" in result.output


def test_config_lists_every_key_with_its_default_and_meaning():
    demo = str(Path(__file__).resolve().parents[1] / "configs/demo.yaml")
    result = runner.invoke(app, ["config", demo, "--key", "model.diffcl", "--changed",
                                 "--set", "model.diffcl.item_graph_weighting=by_degree",
                                 "--set", "model.diffcl.modalities=[audio, image]"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("│ model.")]
    # Only what --set changed under model.diffcl, in the order the keys are defined.
    assert [line.split("│")[1].strip() for line in lines] == ["model.diffcl.modalities",
                                                               "model.diffcl.item_graph_weighting"]
    assert "['audio', 'image']" in lines[0]  # a list value printed as it is, not read as markup
    assert "by_degree" in lines[1] and "uniform" in lines[1] and "how much of the item-item graph" in lines[1]

    result = runner.invoke(app, ["config", demo, "--key", "model.difcl"])
    assert result.exit_code == 2
    assert "model.difcl: no such config key or section; model holds:" in result.output and "diffcl" in result.output
