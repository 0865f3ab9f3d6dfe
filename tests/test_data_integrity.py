"""Issue 10, data integrity and messages: a prepared set is used whole or not at all, features are
finite, complete and of the right row count, and bad input (gzip, CSV, .npy, config) gets a one-line
error naming the file, line or key."""

import gzip
import json
import shutil

import numpy as np
import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from diffcl.core.config import ConfigError, load_config
from diffcl.core.feature_files import FeatureFileError, read_features, write_features
from diffcl.core.prepared import PreparedDataError
from diffcl.core.workspace import DatasetDirs
from diffcl.data import InteractionData
from diffcl.training.errors import TrainError
from diffcl.training.run import build_run
from features.readers.amazon import read_amazon
from features.readers.mmrec import read_mmrec
from features.readers.tables import read_table
from features.records import DataError, ParseReport
from flows.cli import app
from pipeline.embed import modality_features
from pipeline.graphs import build_graphs
from pipeline.prepare import prepare

runner = CliRunner()
TRAIN = ["train.device=cpu", "train.threads=1", "train.epochs=2", "train.batch_size=512", "model.diffcl.cl_nodes=64"]


def _demo(tmp_path, demo_source, *overrides: str, **prepare_kw):
    base = {"workspace": str(tmp_path / "ws"), "prepare": prepare_kw,
            "dataset": {"name": "demo", "source": "amazon2018", "reviews": str(demo_source["reviews"]),
                        "meta": str(demo_source["meta"])}}
    return load_config(base, list(overrides))


@pytest.fixture
def prepared(tmp_path, demo_source):
    """The demo dataset prepared into a fresh workspace: returns (make config, dataset dirs)."""
    config = _demo(tmp_path, demo_source)
    prepare(config, progress=False)
    return (lambda *o: _demo(tmp_path, demo_source, *o)), DatasetDirs.of(config.workspace, "demo")


def _write_modalities(dirs: DatasetDirs, n_items: int, **rows_of: int) -> None:
    rng = np.random.default_rng(0)
    for modality, width in (("text", 12), ("image", 8)):
        write_features(dirs.features / f"{modality}.parquet", rng.normal(size=(rows_of.get(modality, n_items), width)))


# --------------------------------------------------------------------------- 5: the prepared set
def test_prepare_killed_between_renames_leaves_a_set_every_reader_rejects(tmp_path, demo_source, prepared, monkeypatch):
    make, dirs = prepared
    assert InteractionData.load(dirs.prepared).n_items > 0
    stats = json.loads((dirs.prepared / "stats.json").read_text())
    assert set(stats["tables"]) == {"interactions.parquet", "items.parquet", "users.parquet"}

    # A rerun with another split seed, killed after its tables are renamed but before stats.json.
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pipeline.prepare.write_json_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(_demo(tmp_path, demo_source, seed=7), progress=False)
    monkeypatch.undo()

    message = r"interactions\.parquet is not the table stats\.json describes.*rerun `diffcl prepare`"
    with pytest.raises(PreparedDataError, match=message):
        InteractionData.load(dirs.prepared)
    with pytest.raises(PreparedDataError, match=message):
        build_graphs(make())
    with pytest.raises(TrainError, match=message):
        build_run(make(*TRAIN, "model.name=mf"))
    result = runner.invoke(app, ["graphs", _yaml(tmp_path, make())])
    assert result.exit_code == 2 and "rerun `diffcl prepare`" in result.output


def test_one_table_replaced_is_named(prepared, tmp_path, demo_source):
    make, dirs = prepared
    other = _demo(tmp_path / "other", demo_source, kcore=6)
    prepare(other, progress=False)
    shutil.copy(DatasetDirs.of(other.workspace, "demo").prepared / "users.parquet", dirs.prepared / "users.parquet")
    with pytest.raises(PreparedDataError, match=r"users\.parquet is not the table stats\.json describes"):
        InteractionData.load(dirs.prepared)


def test_items_are_verified_by_the_feature_stage(prepared):
    make, dirs = prepared
    pl.read_parquet(dirs.prepared / "items.parquet").head(5).write_parquet(dirs.prepared / "items.parquet")
    with pytest.raises(PreparedDataError, match=r"items\.parquet is not the table"):
        modality_features(make(), "image", progress=False)


def test_missing_or_old_stats_say_to_rerun_prepare(prepared):
    _, dirs = prepared
    stats = json.loads((dirs.prepared / "stats.json").read_text())
    (dirs.prepared / "stats.json").write_text(json.dumps({k: v for k, v in stats.items() if k != "tables"}))
    with pytest.raises(PreparedDataError, match=r"records no table hashes.*rerun `diffcl prepare`"):
        InteractionData.load(dirs.prepared)
    (dirs.prepared / "stats.json").unlink()
    with pytest.raises(PreparedDataError, match=r"stats\.json is missing\); rerun `diffcl prepare`"):
        InteractionData.load(dirs.prepared)


# --------------------------------------------------------------------------- 6: non-finite values
def _mmrec(tmp_path, n_items=6, features=None):
    folder = tmp_path / "toy"
    folder.mkdir(exist_ok=True)
    rows = ["userID\titemID\tx_label"]
    rows += [f"{u}\t{i}\t{0 if i < n_items - 2 else (1 if i == n_items - 2 else 2)}" for u in range(6) for i in range(n_items)]
    (folder / "toy.inter").write_text("\n".join(rows) + "\n")
    for name, array in (features or {}).items():
        np.save(folder / f"{name}_feat.npy", array, allow_pickle=True)
    return folder


def _mmrec_config(tmp_path, folder):
    return load_config({"workspace": str(tmp_path / "ws"), "dataset": {"name": "toy", "source": "mmrec", "path": str(folder)},
                        "prepare": {"kcore": 1}})


def test_non_finite_shipped_features_are_rejected_at_import(tmp_path):
    image = np.ones((6, 4), dtype=np.float32)
    image[3, 1] = np.nan
    image[5, 0] = np.inf
    config = _mmrec_config(tmp_path, _mmrec(tmp_path, features={"image": image}))
    prepare(config, progress=False)
    with pytest.raises(FeatureFileError, match=r"image_feat\.npy: row 3 holds NaN or inf \(2 such row\(s\)\)"):
        modality_features(config, "image", progress=False)
    assert not (DatasetDirs.of(config.workspace, "toy").features / "image.parquet").exists()


def test_non_finite_feature_file_is_rejected_on_read(tmp_path):
    matrix = np.zeros((5, 3), dtype=np.float32)
    matrix[2, 2] = -np.inf
    write_features(tmp_path / "text.parquet", matrix)
    with pytest.raises(FeatureFileError, match=r"text\.parquet: row 2 holds NaN or inf"):
        read_features(tmp_path / "text.parquet")


def test_a_non_finite_loss_stops_training(prepared):
    make, _ = prepared
    trainer = build_run(make(*TRAIN, "model.name=mf"), run_id="nan")
    loss = trainer.model.loss

    def poisoned(batch):
        parts = loss(batch)
        return {**parts, "loss": parts["loss"] * torch.tensor(float("nan"))}

    trainer.model.loss = poisoned
    with pytest.raises(TrainError, match=r"non-finite loss at epoch 1 \(loss nan, .*lower train\.lr"):
        trainer.fit()
    assert not (trainer.run_dir / "best.pt").exists() and not (trainer.run_dir / "metrics.json").exists()


# --------------------------------------------------------------------------- 7: missing modality
def test_a_configured_modality_without_features_is_an_error(prepared, tmp_path):
    make, dirs = prepared
    n_items = InteractionData.load(dirs.prepared).n_items
    _write_modalities(dirs, n_items)
    (dirs.features / "image.parquet").unlink()
    message = (r"model {} reads the image modality but .*image\.parquet does not exist; "
               r"run `diffcl features CONFIG`")
    with pytest.raises(TrainError, match=message.format("diffcl")):
        build_run(make(*TRAIN, "model.name=diffcl"))
    with pytest.raises(FeatureFileError, match=message.format("freedom")):
        build_graphs(make("model.name=freedom"))
    result = runner.invoke(app, ["train", _yaml(tmp_path, make(*TRAIN, "model.name=diffcl"))])
    assert result.exit_code == 2 and "run `diffcl features CONFIG`" in result.output

    # Allowed, or switched off, or an ID-only model: it trains without the image modality.
    build_graphs(make())
    assert build_run(make(*TRAIN, "model.name=diffcl", "model.allow_missing_modalities=true")).model.modalities == ["text"]
    assert build_run(make(*TRAIN, "model.name=freedom", "features.image.enabled=false")).model.modalities == ["text"]
    assert build_run(make(*TRAIN, "model.name=lightgcn")).model.name == "lightgcn"  # reads no features


# --------------------------------------------------------------------------- 9: row counts
@pytest.mark.parametrize("extra", [-1, 1])
def test_feature_rows_must_match_the_items_everywhere(prepared, extra):
    make, dirs = prepared
    n_items = InteractionData.load(dirs.prepared).n_items
    _write_modalities(dirs, n_items, text=n_items + extra)
    message = rf"text\.parquet: {n_items + extra} rows but the dataset has {n_items} items; rerun `diffcl features`"
    with pytest.raises(FeatureFileError, match=message):
        build_graphs(make("model.name=lightgcn"))
    with pytest.raises(TrainError, match=message):
        build_run(make(*TRAIN, "model.name=diffcl"))


def test_shipped_matrix_of_another_row_count_fails_prepare(tmp_path):
    config = _mmrec_config(tmp_path, _mmrec(tmp_path, features={"text": np.zeros((7, 4), dtype=np.float32)}))
    with pytest.raises(DataError, match=r"text_feat\.npy: 7 rows but the dataset has 6 items \(itemID 0\.\.5\)"):
        prepare(config, progress=False)


# --------------------------------------------------------------------------- 10: broken gzip
def _reviews(n=2000) -> bytes:
    return gzip.compress(b"".join(b'{"reviewerID": "U%d", "asin": "A%d", "overall": 5.0}\n' % (i, i % 7) for i in range(n)))


def test_truncated_gzip_is_named(tmp_path):
    path = tmp_path / "Reviews_5.json.gz"
    data = _reviews()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"Reviews_5\.json\.gz: the gzip file is truncated"):
        read_amazon("amazon2018", path, None)
    (tmp_path / "c.yaml").write_text(f"workspace: {tmp_path / 'ws'}\ndataset:\n  name: r\n  source: amazon2018\n"
                                     f"  reviews: {path}\n")
    result = runner.invoke(app, ["prepare", str(tmp_path / "c.yaml")])
    assert result.exit_code == 2 and "the gzip file is truncated" in result.output


@pytest.mark.parametrize("damage", ["deflate", "header"])
def test_corrupt_gzip_is_named(tmp_path, damage):
    data = bytearray(_reviews())
    if damage == "deflate":
        data[30:60] = b"\xff" * 30  # zlib.error
    else:
        data[2] = 7  # unknown compression method: gzip.BadGzipFile
    path = tmp_path / "r.json.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"r\.json\.gz: corrupt gzip data \(.+\); fetch the file again"):
        read_amazon("amazon2018", path, None)


# --------------------------------------------------------------------------- 11: config loading
def test_config_path_that_is_a_folder_or_not_utf8(tmp_path):
    with pytest.raises(ConfigError, match=r"config path .* is a folder, not a YAML file"):
        load_config(tmp_path)
    path = tmp_path / "c.yaml"
    path.write_bytes(b"dataset:\n  name: caf\xe9\n  source: mmrec\n")
    with pytest.raises(ConfigError, match=r"c\.yaml is not UTF-8 text \(line 2: byte 0xe9\)"):
        load_config(path)
    result = runner.invoke(app, ["prepare", str(tmp_path)])
    assert result.exit_code == 2 and "is a folder" in result.output


@pytest.mark.parametrize(("override", "message"), [
    ("model.name=nope", r"model\.name: .*unknown model 'nope'; known: \['diffcl', 'freedom', 'lightgcn', 'mf'\]"),
    ("publish.metric=recall@7", r"publish\.metric 'recall@7' must be .* with K in eval\.topk \[5, 10, 20, 50\]"),
    ("eval.topk=[0,20]", r"eval\.topk\.0: Input should be greater than 0"),
    ("eval.topk=[]", r"eval\.topk: List should have at least 1 item"),
])
def test_config_values_checked_when_it_loads(override, message):
    base = {"dataset": {"name": "x", "source": "mmrec", "path": "x"}}
    with pytest.raises(ConfigError, match=message):
        load_config(base, [override])


# --------------------------------------------------------------------------- 12: messages
@pytest.mark.parametrize("name", ["i.csv", "i.csv.gz", "i.jsonl"])
def test_non_utf8_table_names_the_line(tmp_path, name):
    text = (b'{"u": "a"}\n{"u": "b\xff"}\n' if name.endswith("jsonl") else b"u,i\na,1\nb\xff,2\n")
    path = tmp_path / name
    path.write_bytes(gzip.compress(text) if name.endswith(".gz") else text)
    line = 2 if name.endswith("jsonl") else 3
    with pytest.raises(DataError, match=rf"{name}: cannot be read as \w+: line {line} is not UTF-8 text \(byte 0xff\)"):
        read_table(path, "auto")


def test_bad_share_shows_enough_digits_to_be_true():
    report = ParseReport("r.json", records=199, bad=2, first_bad_line=5, first_bad_reason="JSONDecodeError")
    with pytest.raises(DataError, match=r"\(1\.01% > prepare\.max_bad_share 1\.00%\)"):
        report.check(0.01)
    report.check(0.0101)


@pytest.mark.parametrize(("array", "message"), [
    (np.array([{"a": 1}], dtype=object), r"image_feat\.npy: not a numeric \.npy matrix \(.*Python objects"),
    (np.zeros(6, dtype=np.float32), r"image_feat\.npy: a float32 array of shape \(6,\); expected a numeric items x dimensions"),
])
def test_pickled_or_1d_npy_is_named(tmp_path, array, message):
    folder = _mmrec(tmp_path, features={"image": array})
    with pytest.raises(DataError, match=message):
        read_mmrec(folder)


def _yaml(tmp_path, config) -> str:
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    return str(path)
