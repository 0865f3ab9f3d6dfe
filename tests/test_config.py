from pathlib import Path

import pytest

from diffcl.core.config import ConfigError, dump_config, load_config
from features.sources import source_files
from pipeline.prepare import effective_kcore


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


BASE = """
workspace: ./ws
dataset:
  name: toy
  source: tables
  interactions: inter.csv
"""


def test_defaults_and_path_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.workspace == tmp_path / "ws"
    assert cfg.dataset.interactions == str(tmp_path / "inter.csv")
    # kcore null is auto: the 5-core on data without a shipped split (this table has none).
    assert cfg.prepare.kcore is None and cfg.prepare.ratios == (0.8, 0.1, 0.1)
    assert effective_kcore(cfg.prepare, "random") == 5 and effective_kcore(cfg.prepare, "shipped") == 1
    assert "kcore: null" in dump_config(cfg)


def test_overrides_are_typed_and_validated(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["prepare.kcore=10", "prepare.min_rating=3.5", "fetch.check_remote=false"])
    assert cfg.prepare.kcore == 10 and cfg.prepare.min_rating == 3.5 and cfg.fetch.check_remote is False
    with pytest.raises(ConfigError, match=r"prepare\.kcore: Input should be greater than or equal to 1"):
        load_config(_write(tmp_path, BASE), ["prepare.kcore=0"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(_write(tmp_path, BASE), ["prepare.kcore"])


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml:\n  prepare\.kcores: unknown key"):
        load_config(_write(tmp_path, BASE + "prepare:\n  kcores: 3\n"))
    with pytest.raises(ConfigError, match=r"dataset\.columns\.usr: unknown key"):
        load_config(_write(tmp_path, BASE), ["dataset.columns.usr=x"])


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset\.source: Input should be 'amazon2014'"):
        load_config(_write(tmp_path, BASE.replace("source: tables", "source: amazon1999")))
    with pytest.raises(ConfigError, match=r"prepare.ratios must be three positive shares"):
        load_config(_write(tmp_path, BASE), ["prepare.ratios=[0.5, 0.1, 0.1]"])
    with pytest.raises(ConfigError, match="needs dataset.path"):
        load_config({"dataset": {"name": "x", "source": "mmrec"}})
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_presets_and_categories_expand_to_published_urls():
    cfg = load_config({"dataset": {"name": "baby", "preset": "baby"}})
    assert cfg.dataset.source == "amazon2014"
    files = {f.role: f.location for f in source_files(cfg.dataset)}
    assert files["reviews"].endswith("/categoryFiles/reviews_Baby_5.json.gz")
    assert files["meta"].endswith("/categoryFiles/meta_Baby.json.gz")
    cfg = load_config({"dataset": {"name": "sci", "source": "amazon2023", "category": "Industrial_and_Scientific"}})
    files = {f.role: f.location for f in source_files(cfg.dataset)}
    assert files["reviews"].endswith("/review_categories/Industrial_and_Scientific.jsonl.gz")
    assert files["meta"].endswith("/meta_categories/meta_Industrial_and_Scientific.jsonl.gz")
    with pytest.raises(ConfigError, match="preset 'baby' is an amazon2014 dataset"):
        load_config({"dataset": {"name": "b", "preset": "baby", "source": "mmrec"}})


def test_shipped_configs_are_valid():
    root = Path(__file__).resolve().parents[1]
    for path in sorted((root / "configs").glob("*.yaml")):
        load_config(path)
    for overlay in sorted((root / "configs/overlays").glob("*.yaml")):
        cfg = load_config(root / "configs/scientific.yaml", overlays=[overlay])
        assert cfg.model_dump() != load_config(root / "configs/scientific.yaml").model_dump(), overlay
    new_items = load_config(root / "configs/scientific.yaml", overlays=[root / "configs/overlays/new-items.yaml"])
    assert (new_items.train.negatives, new_items.model.diffcl.new_item_id) == ("trained_items", "from_content")


def test_a_bare_preset_name_is_a_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("clothing", ["prepare.kcore=10"])
    assert cfg.dataset.name == "clothing" and cfg.dataset.source == "amazon2014" and cfg.prepare.kcore == 10
    files = {f.role: f.location for f in source_files(cfg.dataset)}
    assert files["reviews"].endswith("reviews_Clothing_Shoes_and_Jewelry_5.json.gz")


def test_every_config_key_says_what_it_is():
    from diffcl.core.config import REQUIRED, config_keys, keys_under

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs/demo.yaml", ["model.diffcl.diffusion.graph_k=5"])
    keys = {k.key: k for k in config_keys(cfg)}
    assert not [name for name, k in keys.items() if not k.description]
    # Nested sections are walked to their leaves; a required key has no default, a resolved path is
    # compared as loading resolves it.
    graph_k = keys["model.diffcl.diffusion.graph_k"]
    assert (graph_k.value, graph_k.default, graph_k.changed) == (5, 10, True)
    assert keys["dataset.name"].default is REQUIRED and keys["dataset.name"].changed
    assert not keys["train.epochs"].changed and "model.diffcl" not in keys
    assert [k.key for k in keys_under(cfg, "train.lr")] == ["train.lr"]
