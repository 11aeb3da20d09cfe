"""The classifier oracle: the training app (balanced resample, held-out metrics, a weights-only checkpoint),
ClassifierOracle on real images, the count app with oracle=classifier, and bad input named in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir

from biasamp.data import BiasedMNIST
from biasamp.errors import UsageError
from tests.conftest import CONF_DIR, run_app, run_count

ORACLE_ARGS = ["dataset.classes_to_use=[0,1]", "dataset.img_resolution=16", "max_steps=12", "batch_size=32"]


def _one_line_error(proc, prefix: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(prefix), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def bias_oracle(tmp_path_factory) -> Path:
    """A colour oracle for digits 0 and 1, trained for a few steps on the embedded Biased MNIST."""
    cwd = tmp_path_factory.mktemp("oracle")
    proc = run_app("oracle", [*ORACLE_ARGS, "attribute=bias", "name=bias01"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = cwd / "runs" / "oracles" / "bias01" / "oracle.ckpt"
    assert str(path) in proc.stdout and "held-out accuracy=" in proc.stdout
    return path


def test_oracle_checkpoint_holds_heldout_metrics(bias_oracle):
    ckpt = torch.load(bias_oracle, map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "resnet18" and ckpt["num_values"] == 2 and ckpt["img_resolution"] == 16
    assert ckpt["attribute"] == "colour" and ckpt["value_names"] == ["red", "green"]
    assert ckpt["accuracy"] > 0.95
    counts = np.asarray(ckpt["confusion"]["colour"]["counts"])
    assert ckpt["confusion"]["colour"]["labels"] == ["red", "green"]
    assert counts.shape == (2, 2) and counts.sum() == ckpt["n_heldout"]
    assert np.trace(counts) / counts.sum() == pytest.approx(ckpt["accuracy"])
    # the same held-out samples split by class: per class, rows are its (class, bias) groups
    per_class = {c: np.asarray(n) for c, n in ckpt["confusion"]["colour"]["per_class"].items()}
    assert list(per_class) == ckpt["class_names"] and sum(per_class.values()).tolist() == counts.tolist()
    for g in ckpt["group_accuracy"]:
        row = per_class[g["class"]][ckpt["value_names"].index(g["bias"])]
        assert row.sum() == g["n"] and row[ckpt["value_names"].index(g["bias"])] / g["n"] == pytest.approx(
            g["accuracy"])
    assert len(ckpt["group_accuracy"]) == 4 and sum(g["n"] for g in ckpt["group_accuracy"]) == ckpt["n_heldout"]
    assert ckpt["worst_group_accuracy"] == min(g["accuracy"] for g in ckpt["group_accuracy"])
    assert [n["sigma"] for n in ckpt["noise_accuracy"]] == [0.0, 0.05, 0.1, 0.2, 0.5]
    assert ckpt["noise_accuracy"][0]["accuracy"] == pytest.approx(ckpt["accuracy"])
    metrics = json.loads((bias_oracle.parent / "metrics.json").read_text())
    assert metrics["confusion"] == ckpt["confusion"] and "state_dict" not in metrics


def test_balanced_split_has_equal_groups_and_disjoint_heldout():
    from biasamp.oracles.training import balanced_split, group_ids

    data = BiasedMNIST(rho=0.9, classes_to_use=[0, 1, 2], img_resolution=8)
    labels, biases = data.labels.numpy(), data.biases.numpy()
    train, val = balanced_split(labels, biases, 3, 0.2, seed=0)
    groups, sizes = np.unique(group_ids(labels[train], biases[train], 3), return_counts=True)
    assert len(groups) == 9 and len(set(sizes.tolist())) == 1  # every (class, bias) group, equal counts
    assert not set(train.tolist()) & set(val.tolist())
    all_groups, all_sizes = np.unique(group_ids(labels, biases, 3), return_counts=True)
    val_groups, val_sizes = np.unique(group_ids(labels[val], biases[val], 3), return_counts=True)
    assert (val_groups == all_groups).all() and (val_sizes == np.floor(0.2 * all_sizes + 1e-9)).all()
    again, _ = balanced_split(labels, biases, 3, 0.2, seed=0)
    assert (again == train).all()


def test_classifier_oracle_predicts_real_images(bias_oracle):
    from biasamp.oracles import ClassifierOracle

    oracle = ClassifierOracle.from_checkpoint(bias_oracle).to("cpu")
    assert oracle.attributes == ["colour"] and oracle.value_names == [["red", "green"]]
    assert oracle.confusion == torch.load(bias_oracle, weights_only=True)["confusion"]
    # the test split at 32 px: other images than trained on, at another resolution (the oracle resizes)
    data = BiasedMNIST(rho=0.5, split="test", classes_to_use=[0, 1], img_resolution=32)
    images = data.images[::5].float() / 127.5 - 1
    out = oracle(images)
    assert out.bias.shape == (len(images), 1) and out.valid.all()
    assert ((out.confidence >= 0.5) & (out.confidence <= 1)).all()
    assert (out.bias[:, 0] == data.biases[::5]).float().mean() > 0.95


def test_count_with_classifier_oracle_records_confusion(tiny_checkpoint, bias_oracle, tmp_path):
    proc = run_count([f"checkpoint={tiny_checkpoint}", "oracle=classifier", f"oracle.checkpoint={bias_oracle}",
                      "n_per_class=6", "sampler.num_steps=4", "save_grid=false"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (meta_path,) = (tmp_path / "runs" / "count").glob("*/*/meta.json")
    meta = json.loads(meta_path.read_text())
    stored = torch.load(bias_oracle, weights_only=True)["confusion"]
    assert meta["oracle"]["name"] == "classifier" and meta["oracle"]["attributes"] == ["colour"]
    assert meta["oracle"]["confusion"] == stored


def test_bad_oracle_inputs_are_one_line(tiny_checkpoint, bias_oracle, tmp_path):
    from biasamp.counting.plan import plan_job
    from biasamp.counting.schema import check_count_config
    from biasamp.oracles import ClassifierOracle, build_oracle
    from tests.test_count import compose_count

    def check_and_plan(cfg):
        return plan_job(check_count_config(cfg))

    missing = tmp_path / "missing.ckpt"
    with pytest.raises(UsageError) as err:
        check_and_plan(compose_count([f"checkpoint={tiny_checkpoint}", "oracle=classifier",
                                      f"oracle.checkpoint={missing}"]))
    assert str(missing) in str(err.value) and "does not exist" in str(err.value) and "\n" not in str(err.value)

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(bias_oracle.read_bytes()[:3000])
    with pytest.raises(UsageError, match="could not be read"):
        ClassifierOracle.from_checkpoint(corrupt)

    # an oracle whose values do not fit the count checkpoint's bias values; no oracle checkpoint at all
    ckpt = torch.load(bias_oracle, weights_only=True)
    other = tmp_path / "other.ckpt"
    torch.save({**ckpt, "value_names": ["blue", "yellow"]}, other)
    with pytest.raises(UsageError) as err:
        check_and_plan(compose_count([f"checkpoint={tiny_checkpoint}", "oracle=classifier",
                                      f"oracle.checkpoint={other}"]))
    assert "['blue', 'yellow']" in str(err.value) and "['red', 'green']" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="needs oracle.checkpoint="):
        check_and_plan(compose_count([f"checkpoint={tiny_checkpoint}", "oracle=classifier"]))

    from biasamp.checkpoints import load_checkpoint, metadata
    meta = metadata(load_checkpoint(tiny_checkpoint))
    with pytest.raises(UsageError, match="oracle.foo is not an option"):
        build_oracle({"name": "classifier", "checkpoint": str(bias_oracle), "foo": 1}, meta)

    proc = run_app("oracle", [*ORACLE_ARGS, "attribute=foo"], tmp_path / "c")
    assert "attribute='foo' is not allowed" in _one_line_error(proc, "biasamp.oracle: error:")
    assert not list((tmp_path / "c").rglob("oracle.ckpt"))


class _Payload:
    """Pickled into a file, this would run code on loading (here: just a print)."""

    def __reduce__(self):
        return (print, ("this ran",))


def test_oracle_files_that_are_not_oracles_are_usage_errors(bias_oracle, tmp_path, capsys):
    from biasamp.oracles.classifier import load_oracle_checkpoint

    code = tmp_path / "code.ckpt"
    torch.save({**torch.load(bias_oracle, weights_only=True), "extra": _Payload()}, code)
    with pytest.raises(UsageError, match=r"^oracle checkpoint .*code\.ckpt holds pickled Python objects \(code\)") \
            as err:
        load_oracle_checkpoint(code)
    assert "refuses to load" in str(err.value) and "\n" not in str(err.value)
    assert "this ran" not in capsys.readouterr().out  # never unpickled
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UsageError, match="could not be read .*truncated or not a biasamp file"):
        load_oracle_checkpoint(garbage)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(UsageError, match="is not a biasamp oracle checkpoint"):
        load_oracle_checkpoint(foreign)
    partial = tmp_path / "partial.ckpt"
    torch.save({"biasamp_oracle_format": 1, "arch": "resnet18"}, partial)
    with pytest.raises(UsageError, match="lacks \\['state_dict'"):
        load_oracle_checkpoint(partial)
    with pytest.raises(UsageError, match="^oracle checkpoint .*absent.ckpt does not exist"):
        load_oracle_checkpoint(tmp_path / "absent.ckpt")


def test_oracle_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    from biasamp.oracles.classifier import save_oracle_checkpoint

    path = tmp_path / "o" / "oracle.ckpt"
    save_oracle_checkpoint(path, {"a": torch.ones(2), "names": ["x"]})
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in path.parent.iterdir()] == ["oracle.ckpt"]  # no temporary file left
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    save_oracle_checkpoint(path, {"a": torch.zeros(2)})
    assert len(synced) == 2  # the file, then its folder

    def broken_save(obj, handle):
        handle.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_oracle_checkpoint(path, {"a": torch.full((2,), 7.0)})
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.zeros(2))  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["oracle.ckpt"]


def compose_oracle(overrides: list[str]):
    import biasamp.oracle  # noqa: F401 - registers the folder resolver

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("oracle_train", overrides=overrides)


@pytest.mark.parametrize("override, pattern", [
    ("attribute=colour", r"^attribute='colour' is not allowed"),
    ("name=a/b", r"^name='a/b' is not allowed: a folder name is one non-empty path component"),
    ("threads=0", r"^threads=0 is not allowed: a positive integer, or auto"),
    ("lr=nan", r"^lr=nan is not allowed"),
    ("rho=null", r"^dataset\.rho=null is not allowed for this dataset.*only for waterbirds and bffhq"),
    ("dataset.classes_to_use=[4]", r"^dataset=biased_mnist with 1 class is not allowed"),
    ("+epochs=3", r"^epochs is not a setting of the oracle app"),
    ("max_epochs=0", r"^max_epochs=0 is not allowed"),
])
def test_oracle_check_config_refuses_before_any_work(override, pattern):
    from biasamp.oracles.training import check_config

    with pytest.raises(UsageError, match=pattern) as err:
        check_config(compose_oracle([override]))
    assert "\n" not in str(err.value)


def test_oracle_check_config_passes_the_defaults_and_rho_null_for_real_data():
    from biasamp.oracles.training import check_config

    check_config(compose_oracle([]))
    check_config(compose_oracle(["dataset=waterbirds", "rho=null", "attribute=target"]))
    with pytest.raises(UsageError, match="^attribute=bias is not allowed for dataset=multicolor_mnist"):
        check_config(compose_oracle(["dataset=multicolor_mnist"]))


def test_a_diverging_oracle_is_a_runtime_error_not_a_usage_error():
    from biasamp.oracles.training import AttributeClassifier, OracleTrainingDiverged

    class NaNModel(torch.nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 2), float("nan"))

    module = AttributeClassifier(NaNModel(), lr=1e-3, resolution=8, imagenet_norm=False)
    batch = (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(OracleTrainingDiverged, match="training loss became nan at step 1") as err:
        module.training_step(batch, 0)
    assert isinstance(err.value, RuntimeError) and not isinstance(err.value, UsageError)


def test_a_library_value_error_keeps_its_traceback(tmp_path, monkeypatch):
    import biasamp.oracles.training as app
    from biasamp.apps import run_app as run_in_app

    def broken(cfg):
        raise ValueError("a pandas parser bug")

    monkeypatch.setattr(app, "build_dataset", broken)
    with pytest.raises(ValueError, match="a pandas parser bug"):  # not turned into exit 2
        run_in_app("oracle", lambda: app.train_oracle(compose_oracle(["device=cpu"]), tmp_path / "out"))


@pytest.mark.parametrize("args, needle", [
    ([*ORACLE_ARGS, "name=../up"], "name='../up' is not allowed"),
    (["dataset=waterbirds", "paths.data_dir=/nonexistent"], "Waterbirds metadata not found"),
    ([*ORACLE_ARGS, "dataset.class_size=1"], "group has only 1 sample(s)"),
])
def test_oracle_app_refuses_with_one_line_and_leaves_no_folder(args, needle, tmp_path):
    proc = run_app("oracle", args, tmp_path)
    assert needle in _one_line_error(proc, "biasamp.oracle: error:")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_class_oracle_adds_class_fidelity_without_changing_the_bias_counts(tiny_checkpoint, tmp_path):
    """count with class_oracle=<attribute=target oracle>: a class_pred column, class fidelity in results.csv and
    meta.json equal to the share of samples predicted as their own class, and the same colour counts as
    without it (in a job folder of its own)."""
    proc = run_app("oracle", [*ORACLE_ARGS, "attribute=target", "name=target01"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    target = tmp_path / "runs" / "oracles" / "target01" / "oracle.ckpt"
    args = [f"checkpoint={tiny_checkpoint}", "n_per_class=6", "sampler.num_steps=4", "save_grid=false",
            "sweep_name=fid"]
    assert run_count(args, tmp_path).returncode == 0
    proc = run_count([*args, f"class_oracle={target}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class fidelity=" in proc.stdout
    sweep = tmp_path / "runs" / "count" / "fid"
    (plain,) = [p for p in sweep.iterdir() if p.is_dir() and "-fid-" not in p.name and p.name != "report"]
    (fid,) = [p for p in sweep.iterdir() if "-fid-" in p.name]
    with_pred = pd.read_csv(fid / "counts.csv")
    assert list(with_pred.columns) == ["class", "colour", "class_pred", "valid", "count"]
    summed = with_pred.groupby(["class", "colour", "valid"], sort=False)["count"].sum().reset_index()
    assert summed.equals(pd.read_csv(plain / "counts.csv"))  # the bias counts do not change
    k = int(with_pred.loc[with_pred["class"].astype(str) == with_pred["class_pred"].astype(str), "count"].sum())
    results = pd.read_csv(sweep / "results.csv").set_index("job_dir")
    row = results.loc[fid.name]
    assert row["class_fidelity"] == pytest.approx(k / 12) and row["class_fidelity_n"] == 12
    assert row["class_fidelity_low"] <= k / 12 <= row["class_fidelity_high"]
    assert pd.isna(results.loc[plain.name, "class_fidelity"])
    meta = json.loads((fid / "meta.json").read_text())
    assert meta["class_oracle"]["class_fidelity"] == pytest.approx(k / 12)
    assert meta["class_oracle"]["confusion"] == torch.load(target, weights_only=True)["confusion"]
    assert "per_class" not in meta["class_oracle"]["confusion"]["class"]  # the class oracle: pooled only

    proc = run_app("report", [f"sweep={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "class fidelity" in (sweep / "report" / "results.md").read_text()
