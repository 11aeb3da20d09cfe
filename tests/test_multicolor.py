"""Multi-Color MNIST: two bias attributes (left and right background halves), each with its own rho, from the
dataset through training, the colour oracle, counts.csv, results.csv and the report."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from biasamp.checkpoints import load_checkpoint
from biasamp.counting.plan import data_rho
from biasamp.counting.results import update_results
from biasamp.data import PALETTE, build_dataset
from biasamp.data.multicolor_mnist import MultiColorMNIST
from biasamp.data.stream import to_model_range
from biasamp.errors import UsageError
from biasamp.oracles import ColourOracle, build_oracle
from tests.conftest import run_app, run_train


def test_each_half_gets_exactly_its_own_rho_per_class():
    d = MultiColorMNIST(rho_left=0.9, rho_right=0.7, classes_to_use=[0, 1, 2], class_size=10, img_resolution=28)
    labels, biases = d.labels.numpy(), d.biases.numpy()
    assert biases.shape == (30, 2)
    for k in range(3):
        own = labels == k
        assert int((biases[own, 0] == k).sum()) == 9  # floor(10 * 0.9)
        assert int((biases[own, 1] == k).sum()) == 7  # floor(10 * 0.7)
        assert set(biases[own, 0]) <= {0, 1, 2} and set(biases[own, 1]) <= {0, 1, 2}
    s = d.summary()
    assert s["bias_attributes"] == ["left", "right"]
    assert s["rho_by_attribute"] == {"left": pytest.approx(0.9), "right": pytest.approx(0.7)}
    assert s["rho_per_class_by_attribute"]["right"] == pytest.approx([0.7, 0.7, 0.7])
    assert s["rho_effective"] == pytest.approx(0.9) and s["n_aligned"] == 27


def test_halves_are_coloured_by_their_own_bias_and_the_digit_is_white():
    d = MultiColorMNIST(rho_left=0.5, rho_right=0.5, img_resolution=28, class_size=20)
    palette = PALETTE[np.asarray(d.classes_to_use)]
    images, biases = d.images.numpy(), d.biases.numpy()
    for i in range(0, len(d), 17):
        img = images[i]
        ink = (img == 255).all(axis=0)
        for half, cols in ((0, slice(0, 14)), (1, slice(14, 28))):
            background = img[:, :, cols][:, ~ink[:, cols]]
            colour = palette[biases[i, half]]
            if not (colour == 255).all():
                assert (background == colour[:, None]).all(), (i, half)


def test_left_and_right_alignment_are_independent():
    d = MultiColorMNIST(rho_left=0.5, rho_right=0.5)  # 4,000 images
    aligned = d.biases.numpy() == d.labels.numpy()[:, None]
    both = (aligned[:, 0] & aligned[:, 1]).mean()
    # independent halves: P(both) = 0.25; hypergeometric sd ~ 0.0055 per class pooled over 10 classes
    assert both == pytest.approx(0.25, abs=0.03)
    again = MultiColorMNIST(rho_left=0.5, rho_right=0.5)
    assert torch.equal(again.biases, d.biases) and torch.equal(again.images, d.images)
    other = MultiColorMNIST(rho_left=0.5, rho_right=0.5, seed=1)
    assert not torch.equal(other.biases, d.biases)


def test_items_carry_both_bias_indices():
    d = build_dataset({"name": "multicolor_mnist", "rho_left": 1.0, "rho_right": 0.0, "classes_to_use": [3, 5],
                       "class_size": 4})
    image, label, bias = d[0]
    assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
    assert label == 0 and bias.tolist() == [0, 1]  # left always aligned, right never (2 classes)


@pytest.mark.parametrize("kwargs, needle", [
    ({"rho_left": 1.2, "rho_right": 0.9}, "dataset.rho_left=1.2"),
    ({"rho_left": 0.9, "rho_right": [0.9]}, "dataset.rho_right=[0.9]"),
    ({"rho_left": 0.9, "rho_right": 0.9, "class_size": 0}, "dataset.class_size=0"),
    ({"rho_left": None, "rho_right": 0.9}, "dataset.rho_left=null is not allowed"),
])
def test_bad_settings_name_the_key(kwargs, needle):
    with pytest.raises(UsageError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        MultiColorMNIST(**kwargs)


def test_colour_oracle_reads_each_half_of_real_images():
    for resolution in (28, 32, 64):
        d = MultiColorMNIST(rho_left=0.5, rho_right=0.5, class_size=30, img_resolution=resolution)
        oracle = ColourOracle(d.bias_names, regions=("left", "right"))
        out = oracle(to_model_range(d.images))
        assert oracle.attributes == ["left", "right"]
        assert torch.equal(out.bias, d.biases) and bool(out.valid.all()), resolution


def test_build_oracle_takes_the_halves_from_the_checkpoint_metadata():
    meta = {"config": {"dataset": {"name": "multicolor_mnist"}}, "bias_names": ["red", "green"],
            "data": {"bias_attributes": ["left", "right"]}}
    oracle = build_oracle({"name": "colour"}, meta)
    assert oracle.attributes == ["left", "right"] and oracle.value_names == [["red", "green"]] * 2
    with pytest.raises(UsageError, match="oracle=colour"):
        build_oracle({"name": "classifier", "checkpoint": "x.ckpt"}, meta)


def test_data_rho_per_attribute_and_no_silent_fallback():
    meta = {"rho_data": 0.99, "data": {"rho_by_attribute": {"left": 0.99, "right": 0.95}}}
    assert data_rho(meta, "right", 2) == 0.95 and data_rho(meta, "left", 2) == 0.99
    with pytest.raises(UsageError, match="'colour'"):
        data_rho(meta, "colour", 1)
    assert data_rho({"rho_data": 0.9, "data": {}}, "bias", 1) == 0.9  # an old single-attribute checkpoint


def test_results_rows_of_a_rerun_job_are_replaced_not_duplicated(tmp_path):
    path = tmp_path / "results.csv"
    update_results(path, [{"job_dir": "a", "attribute": "left", "n": 1}, {"job_dir": "a", "attribute": "right",
                                                                           "n": 1}])
    update_results(path, [{"job_dir": "b", "attribute": "left", "n": 5}])
    update_results(path, [{"job_dir": "a", "attribute": "left", "n": 2}, {"job_dir": "a", "attribute": "right",
                                                                           "n": 2}])
    df = pd.read_csv(path)
    assert sorted(zip(df["job_dir"], df["attribute"], df["n"], strict=True)) == [("a", "left", 2), ("a", "right", 2),
                                                                    ("b", "left", 5)]


def test_train_cli_runs_a_few_steps_and_records_both_rhos(tmp_path):
    """The issue's done-when: `python -m biasamp.train dataset=multicolor_mnist ...` trains a few steps on CPU.
    (Counting and reporting both attributes: the paper-multicolor recipe in tests/test_experiments.py.)"""
    proc = run_train(["dataset=multicolor_mnist", "model=tiny", "rho=0.99", "dataset.rho_right=0.8",
                      "dataset.classes_to_use=[0,1]", "batch_size=16", "trainer.max_steps=3", "name=mc"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "train" / "mc"  # name=mc: a link to the run folder
    assert json.loads((run / "train_summary.json").read_text())["n_img"] == 48
    (ckpt,) = (run / "checkpoints").glob("ckpt-*.ckpt")
    data = load_checkpoint(ckpt)["hyper_parameters"]["data"]
    assert data["bias_attributes"] == ["left", "right"]
    assert data["rho_by_attribute"] == {"left": pytest.approx(0.99), "right": pytest.approx(0.8)}


def test_missing_full_mnist_names_the_prepare_command(tmp_path):
    with pytest.raises(UsageError, match=r"python -m biasamp\.data\.prepare mnist --data-dir"):
        MultiColorMNIST(rho_left=0.9, rho_right=0.9, source="torchvision", data_dir=tmp_path)


def test_results_csv_keeps_null_strings_when_rows_are_added(tmp_path):
    path = tmp_path / "results.csv"
    update_results(path, [{"job_dir": "a", "guidance_uncond": "null", "guidance_interval": ""}])
    update_results(path, [{"job_dir": "b", "guidance_uncond": "null", "guidance_interval": ""}])
    df = pd.read_csv(path, keep_default_na=False, na_values=[""])
    assert df["guidance_uncond"].tolist() == ["null", "null"] and df["guidance_interval"].isna().all()


def test_oracle_app_trains_a_class_classifier_but_no_two_attribute_bias_oracle(tmp_path):
    args = ["dataset=multicolor_mnist", "dataset.classes_to_use=[0,1]", "dataset.img_resolution=16", "max_steps=3",
            "batch_size=16"]
    proc = run_app("oracle", [*args, "attribute=target", "name=mc_target"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(tmp_path / "runs" / "oracles" / "mc_target" / "oracle.ckpt", weights_only=True)
    assert ckpt["attribute"] == "class" and ckpt["value_names"] == ["0", "1"]
    proc = run_app("oracle", [*args, "attribute=bias", "name=mc_bias"], tmp_path)
    assert proc.returncode == 2 and "oracle=colour" in proc.stderr
