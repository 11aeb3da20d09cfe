"""InvDiff steps 1 and 2: the fixed sigma set, per-sample losses (a hand computation, independence of the batch
size), the grouper on planted groups, the rank AUC and purity, the group V-REx loss, the groups file, and the app
end to end on the tiny checkpoint."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from biasamp.errors import UsageError
from biasamp.mitigation.groups import FORMAT, GroupsFile
from biasamp.mitigation.invdiff import (
    SIGMA_DRAW,
    auc,
    fit_grouper,
    fixed_sigmas,
    grouper_diagnostics,
    loss_settings,
    project_rows,
    sample_losses,
    true_groups,
    vrex_loss,
)
from biasamp.models import one_hot
from biasamp.models.loss import loss_weight
from biasamp.sampling.noise import index_noise
from tests.conftest import run_app
from tests.test_steering import _net

Q75 = 0.6744897501960817  # Phi^-1(0.75)
Q8 = (1.5341205443525463, 0.887146559018876, 0.4887764111146695, 0.1573106846101707)  # -Phi^-1(1/16, 3/16, 5/16, 7/16)


# ------------------------------------------------------------------------------------------------------ sigmas
def test_fixed_sigmas_are_the_lognormal_quantiles_increasing():
    assert fixed_sigmas(-1.2, 1.2, 2) == pytest.approx([math.exp(-1.2 - 1.2 * Q75), math.exp(-1.2 + 1.2 * Q75)],
                                                       rel=1e-12)
    z = [-q for q in Q8] + [q for q in reversed(Q8)]  # symmetric about the median
    expected = [math.exp(-1.2 + 1.2 * v) for v in z]
    got = fixed_sigmas(-1.2, 1.2, 8)
    assert got == pytest.approx(expected, rel=1e-12) and got == sorted(got)
    assert fixed_sigmas(0.0, 1.4, 1) == [1.0]  # the median
    with pytest.raises(ValueError):
        fixed_sigmas(0.0, 1.0, 0)


def test_loss_settings_follow_the_checkpoints_loss_config():
    fn, resolved = loss_settings({"_target_": "biasamp.models.EDMLoss", "P_mean": 0.0, "weighting": "debias"})
    assert resolved["P_mean"] == 0.0 and resolved["P_std"] == 1.2 and resolved["weighting"] == "debias"
    s = torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.allclose(fn(s), 1 / s)
    fn, _ = loss_settings({"weighting": "edm", "sigma_data": 0.25})
    assert torch.allclose(fn(s), loss_weight(s, "edm", sigma_data=0.25))
    with pytest.raises(UsageError, match="loss.weighting"):
        loss_settings({"weighting": "nope"})


# ------------------------------------------------------------------------------------------------------ losses
def _images(n=5):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, 3, 32, 32, generator=g) * 2 - 1, torch.tensor([0, 1, 1, 0, 1])[:n]


def _hand_loss(net, y, label, index, sigmas, seed, weighting="edm"):
    """Image ``index``'s loss written out: mean over the sigmas of lambda * mean (D(y + s n) - y)^2."""
    terms = []
    for j, sigma in enumerate(sigmas):
        s = torch.tensor([sigma], dtype=torch.float32)
        n = index_noise(seed, torch.tensor([index]), j, (3, 32, 32))
        d = net(y[None] + s * n, s, one_hot(torch.tensor([label]), 2))
        err = float(((d - y[None]) ** 2).mean())
        terms.append(float(loss_weight(s.double(), weighting)[0]) * err)
    return sum(terms) / len(terms)


def test_sample_losses_match_a_hand_computation_and_not_the_batch_size():
    net = _net()
    images, labels = _images()
    fn, _ = loss_settings({"weighting": "edm"})
    sigmas = fixed_sigmas(-1.2, 1.2, 3)
    runs = [sample_losses(net, images, labels, sigmas, None, fn, 7, b, "cpu") for b in (1, 2, 5)]
    assert runs[0].dtype == torch.float64 and runs[0].shape == (5,)
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=1e-6, atol=0)
    for i in (0, 3):
        assert float(runs[0][i]) == pytest.approx(_hand_loss(net, images[i], int(labels[i]), i, sigmas, 7), rel=1e-5)
    # uint8 images give the same as their [-1, 1] version; another seed gives other noise
    u8 = torch.randint(0, 256, (3, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    torch.testing.assert_close(sample_losses(net, u8, labels[:3], sigmas, 3, fn, 7, 2, "cpu"),
                               sample_losses(net, u8.float() / 127.5 - 1, labels[:3], sigmas, 3, fn, 7, 3, "cpu"))
    assert not torch.allclose(sample_losses(net, images, labels, sigmas, None, fn, 8, 5, "cpu"), runs[0])


def test_random_mode_draws_one_sigma_per_image_index_independent_of_the_batch_size():
    net = _net()
    images, labels = _images()
    fn, _ = loss_settings({"weighting": "edm"})
    runs = [sample_losses(net, images, labels, None, 1, fn, 5, b, "cpu", P_mean=0.0, P_std=1.4) for b in (1, 3)]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-6, atol=0)
    i = 2  # the documented draw: sigma = exp(P_mean + P_std z), z = draw SIGMA_DRAW of image i, noise draw 0
    z = float(index_noise(5, torch.tensor([i]), SIGMA_DRAW, (1,))[0, 0])
    sigma = float(torch.tensor(math.exp(1.4 * z), dtype=torch.float32))
    assert float(runs[0][i]) == pytest.approx(_hand_loss(net, images[i], int(labels[i]), i, [sigma], 5), rel=1e-5)
    # indices name the noise streams: image 2 placed first with index 2 gets the same loss
    alone = sample_losses(net, images[2:3], labels[2:3], None, 1, fn, 5, 1, "cpu", indices=torch.tensor([2]),
                          P_mean=0.0, P_std=1.4)
    assert float(alone[0]) == pytest.approx(float(runs[0][2]), rel=1e-6)


# ----------------------------------------------------------------------------------------------------- grouper
def _planted():
    g = torch.Generator().manual_seed(1)
    low = 1.0 + 0.05 * torch.randn(200, generator=g, dtype=torch.float64)
    high = 3.0 + 0.05 * torch.randn(50, generator=g, dtype=torch.float64)
    aligned = np.r_[np.ones(200, dtype=bool), np.zeros(50, dtype=bool)]  # the 50 high losses: "conflicting"
    return torch.cat([low, high]), aligned


@pytest.mark.parametrize("K", [2, 8])
def test_grouper_recovers_two_planted_groups_with_rows_on_the_simplex(K):
    losses, aligned = _planted()
    w = fit_grouper(losses, K=K, steps=500, lr=0.01, seed=0)
    assert w.shape == (250, K) and w.dtype == torch.float32
    assert float(w.min()) >= 0 and float((w.double().sum(dim=1) - 1).abs().max()) <= 1e-6
    d = grouper_diagnostics(w, aligned, np.zeros(250, dtype=np.int64), losses=losses)
    assert d["auc"] >= 0.99 and d["purity"] >= 0.99 and d["purity_baseline"] == pytest.approx(0.8)
    assert d["loss_auc"] == 1.0
    if K == 2:
        hard = w.argmax(dim=1).numpy()
        assert len(set(hard[:200])) == 1 and len(set(hard[200:])) == 1 and hard[0] != hard[-1]


def test_grouper_is_deterministic_by_seed():
    losses, _ = _planted()
    a = fit_grouper(losses, K=4, steps=50, seed=3)
    assert torch.equal(a, fit_grouper(losses, K=4, steps=50, seed=3))
    assert not torch.equal(a, fit_grouper(losses, K=4, steps=50, seed=4))
    for bad in ({"K": 1}, {"steps": 0}, {"lr": 0.0}):
        with pytest.raises(ValueError):
            fit_grouper(losses, **bad)


def test_a_row_that_clamps_to_zero_becomes_uniform():
    w = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [1.0, 3.0, -1.0, 0.0]], dtype=torch.float64)
    project_rows(w)
    assert torch.equal(w[0], torch.full((4,), 0.25, dtype=torch.float64))
    assert torch.allclose(w[1], torch.tensor([0.25, 0.75, 0.0, 0.0], dtype=torch.float64))


def test_true_groups_are_one_hot_over_the_present_class_value_pairs():
    w, pairs = true_groups(np.array([1, 0, 0, 1, 1]), np.array([1, 0, 1, 1, 0]))
    assert pairs == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert w.tolist() == [[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]


# -------------------------------------------------------------------------------------------------- diagnostics
def test_auc_is_the_mann_whitney_statistic_with_ties_half():
    # positives 0.5, 0.5, 0.9 against negatives 0.5, 0.1: pairs 1/2, 1, 1/2, 1, 1, 1 -> 5/6
    scores, positive = [0.5, 0.1, 0.5, 0.9, 0.5], [True, False, False, True, True]
    assert auc(scores, positive) == pytest.approx(5 / 6, abs=1e-15)
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75, abs=1e-15)
    assert auc([0.3, 0.3, 0.3], [True, False, False]) == 0.5
    assert auc([-s for s in scores], positive) == pytest.approx(1 / 6, abs=1e-15)
    assert math.isnan(auc([0.1, 0.2], [True, True]))


def test_grouper_diagnostics_by_hand():
    # hard groups 0, 0, 0, 1, 1, 2 (group 3 empty); conflicting images 2, 3, 4
    w = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.2, 0.0], [0.5, 0.4, 0.1, 0.0], [0.1, 0.8, 0.1, 0.0],
                      [0.2, 0.7, 0.1, 0.0], [0.1, 0.1, 0.8, 0.0]])
    aligned = np.array([True, True, False, False, False, True])
    classes = np.array([0, 0, 0, 1, 1, 1])
    d = grouper_diagnostics(w, aligned, classes, losses=np.array([1.0, 1.0, 2.0, 3.0, 3.0, 1.0]))
    assert d["hard_sizes"] == [3, 2, 1, 0] and d["hard_conflicting"] == [1, 2, 0, 0]
    assert d["purity"] == pytest.approx(5 / 6) and d["purity_baseline"] == pytest.approx(0.5)
    # group 1's posterior: conflicting 0.4, 0.8, 0.7 vs aligned 0.1, 0.2, 0.1 -> AUC 1
    assert d["group"] == 1 and d["auc"] == 1.0 and d["auc_raw"] == 1.0
    # group 0: conflicting 0.5, 0.1, 0.2 vs aligned 0.7, 0.6, 0.1: pairs (0.1 vs 0.1) 1/2, (0.5, 0.2 vs 0.1) 1 -> 2.5/9
    assert d["auc_per_group"][0] == pytest.approx(2.5 / 9)
    assert d["per_class"]["0"]["n_conflicting"] == 1 and d["per_class"]["1"]["n_aligned"] == 1
    assert d["loss_auc"] == 1.0
    assert d["soft_conflicting_share"][3] == 0.0 and d["group_loss"][3] == pytest.approx(1.0)
    json.dumps(d, allow_nan=False)  # plain numbers only
    only_aligned = grouper_diagnostics(w, np.ones(6, dtype=bool), classes)
    assert only_aligned["auc"] is None and only_aligned["per_class"]["0"]["auc"] is None


# -------------------------------------------------------------------------------------------------------- V-REx
def test_vrex_loss_by_hand():
    ell = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1]], dtype=torch.float64)  # group 1 empty: dropped
    loss = vrex_loss(ell, g, 1.0)  # L = 1.5, 3.5: mean 2.5, unbiased variance 2
    assert float(loss.detach()) == pytest.approx(4.5, rel=1e-8)
    loss.backward()
    assert ell.grad is not None and torch.isfinite(ell.grad).all()
    soft = torch.tensor([[0.5, 0.5], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    # L0 = (1 + 4) / 1.5 = 10/3, L1 = (1 + 6) / 1.5 = 14/3: mean 4, variance 8/9
    assert float(vrex_loss(torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64), soft, 0.5)) == pytest.approx(
        4 + 0.5 * 8 / 9, rel=1e-8)
    one = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)  # one group left: its mean
    assert float(vrex_loss(torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64), one, 10.0)) == pytest.approx(4.0)
    with pytest.raises(ValueError):
        vrex_loss(torch.ones(2), torch.zeros(2, 3), 1.0)


# --------------------------------------------------------------------------------------------------- groups file
def _groups_file(n=6, k=3):
    w = project_rows(torch.rand(n, k, generator=torch.Generator().manual_seed(0)))
    return GroupsFile(W=w, indices=torch.arange(n), labels=torch.arange(n) % 2, losses=torch.rand(n).double(),
                      sigmas=[0.1, 1.0], sigma_mode="fixed", checkpoint_sha256="ab" * 32,
                      dataset={"config": {"name": "biased_mnist", "rho": 0.9}, "n": n}, source="grouper",
                      settings={"K": k}, diagnostics={"auc": 0.5, "per_class": {"0": {"auc": None}}})


def test_groups_file_round_trip_is_weights_only(tmp_path):
    groups = _groups_file()
    path = tmp_path / "g" / "groups.pt"
    groups.save(path)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT and raw["W"].dtype == torch.float32 and raw["losses"].dtype == torch.float64
    back = GroupsFile.load(path)
    assert torch.equal(back.W, groups.W) and torch.equal(back.indices, groups.indices)
    assert torch.equal(back.losses, groups.losses) and back.sigmas == groups.sigmas
    assert back.dataset == groups.dataset and back.diagnostics == groups.diagnostics and back.K == 3
    back.check_source("ab" * 32, {"name": "biased_mnist", "rho": 0.9}, 6)
    with pytest.raises(UsageError, match="another checkpoint"):
        back.check_source("cd" * 32, {"name": "biased_mnist", "rho": 0.9}, 6)
    with pytest.raises(UsageError, match="another training set"):
        back.check_source("ab" * 32, {"name": "biased_mnist", "rho": 0.95}, 6)


def test_groups_file_refuses_foreign_corrupt_and_inconsistent_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"format": "biasamp.hspace_heads/1"}, foreign)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    bad = _groups_file()
    bad.W = bad.W * 2  # rows summing to 2
    off = tmp_path / "off.pt"
    bad.save(off)
    for path, needle in ((foreign, "not a biasamp InvDiff groups file"), (corrupt, "could not be read"),
                         (off, "not on the simplex"), (tmp_path / "missing.pt", "does not exist")):
        with pytest.raises(UsageError, match=needle) as err:
            GroupsFile.load(path)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------------------------ the app
def _options(ckpt, **changes):
    options = {"checkpoint": str(ckpt), "allow_unfinished": False, "groups": "grouper", "n_sigma": 8, "K": 8,
               "steps": 500, "lr": 0.01, "seed": 0, "batch_size": 256, "device": "cpu", "precision": "fp32",
               "threads": 1, "name": "x"}
    options.update(changes)
    return options


@pytest.mark.parametrize("changes, needle", [
    ({"K": 1}, "K=1 is not allowed"),
    ({"steps": 0}, "steps=0 is not allowed"),
    ({"lr": 0.0}, "lr=0.0 is not allowed"),
    ({"lr": -1}, "lr=-1 is not allowed"),
    ({"n_sigma": 0}, "n_sigma=0 is not allowed"),
    ({"groups": "oracle"}, "groups='oracle' is not allowed"),
    ({"checkpoint": None}, "checkpoint is required"),
    ({"sigma": 1.0}, "sigma is not a setting"),
    ({"name": "a/b"}, "name='a/b' is not allowed"),
])
def test_app_settings_are_checked_before_any_work(changes, needle):
    from biasamp.invdiff_groups import check_config

    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        check_config(_options("ckpt", **changes))


def test_app_refuses_a_missing_checkpoint_and_a_dataset_without_bias_labels(tiny_checkpoint, tmp_path, monkeypatch):
    import biasamp.invdiff_groups as app

    with pytest.raises(UsageError, match="does not exist"):
        app.make_groups(OmegaConf.create(_options(tmp_path / "none.ckpt")), tmp_path / "out")
    plain = SimpleNamespace(name="plain", bias_attributes=[], biases=None, labels=torch.zeros(4, dtype=torch.long))
    monkeypatch.setattr(app, "build_dataset", lambda cfg: plain)
    with pytest.raises(UsageError, match="has no bias labels.*diagnostics"):
        app.make_groups(OmegaConf.create(_options(tiny_checkpoint)), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_app_writes_groups_for_the_checkpoint(tiny_checkpoint, tmp_path):
    from biasamp.counting.plan import sha256_file

    proc = run_app("invdiff_groups", [f"checkpoint={tiny_checkpoint}", "steps=50", "n_sigma=2", "threads=1",
                                      "name=tiny"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "runs" / "invdiff" / "tiny"
    groups = GroupsFile.load(folder / "groups.pt")
    assert groups.checkpoint_sha256 == sha256_file(tiny_checkpoint) and groups.source == "grouper"
    n = groups.dataset["n"]
    assert groups.W.shape == (n, 8) and torch.equal(groups.indices, torch.arange(n))
    assert groups.sigma_mode == "fixed" and groups.sigmas == pytest.approx(fixed_sigmas(0.0, 1.4, 2))  # quickstart
    assert groups.settings["loss"]["weighting"] == "edm" and bool(torch.isfinite(groups.losses).all())
    diagnostics = json.loads((folder / "diagnostics.json").read_text())
    assert {k: v for k, v in diagnostics.items() if k not in ("seconds", "loss_seconds")} == groups.diagnostics
    assert diagnostics["seconds"] >= diagnostics["loss_seconds"] > 0
    # a rerun writes the same file byte for byte (no timings in it): a fine-tune on it keeps its identity
    first = (folder / "groups.pt").read_bytes()
    again = run_app("invdiff_groups", [f"checkpoint={tiny_checkpoint}", "steps=50", "n_sigma=2", "threads=1",
                                       "name=tiny"], tmp_path)
    assert again.returncode == 0 and (folder / "groups.pt").read_bytes() == first
    assert groups.diagnostics["n_conflicting"] > 0 and 0.5 <= groups.diagnostics["auc"] <= 1
    assert "best-group AUC" in proc.stdout and str(folder / "groups.pt") in proc.stdout


def test_app_true_labels_control_is_pure(tiny_checkpoint, tmp_path):
    proc = run_app("invdiff_groups", [f"checkpoint={tiny_checkpoint}", "groups=true_labels", "n_sigma=1",
                                      "threads=1"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp_path / "runs" / "invdiff").glob("*-true_labels-sigma1random-seed0/groups.pt")
    groups = GroupsFile.load(path)
    assert groups.source == "true_labels" and groups.K == 4 and groups.sigma_mode == "random" and groups.sigmas == []
    d = groups.diagnostics
    assert d["purity"] == 1.0 and d["true_groups"] == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert all(e["auc"] == 1.0 for e in d["per_class"].values())  # within a class one group is the conflicting
    # no single group holds the conflicting images of both classes: the best one, (0, 1), holds half of them
    assert d["auc"] == pytest.approx(0.75)


def test_app_bad_input_is_one_line_exit_2_and_leaves_no_folder(tiny_checkpoint, tmp_path):
    proc = run_app("invdiff_groups", [f"checkpoint={tiny_checkpoint}", "K=1", "name=bad"], tmp_path)
    assert proc.returncode == 2 and "K=1 is not allowed" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "runs" / "invdiff" / "bad").exists()
