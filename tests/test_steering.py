"""h-space steering (Balancing Act): the sigmas a sampler evaluates, the closed-form head gradients against
autograd, blocks that never see each other, the hook's row layout under guidance, and a steered denoiser that is
bit-identical to the plain one at scale 0."""

from __future__ import annotations

import math

import pytest
import torch

from biasamp.models.build import build_denoiser
from biasamp.sampling import IndexNoise, evaluated_sigmas, guided_denoiser, sample
from biasamp.sampling.steering import (
    HSpaceRecorder,
    HSpaceSteerer,
    LinearHeads,
    block_means,
    distribution_loss,
    hspace_block,
)

TINY = {"name": "tiny", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,
        "net": {"model_channels": 8, "channel_mult": [1, 2, 2], "channel_mult_emb": 4, "num_blocks": 1,
                "attn_resolutions": [], "dropout": 0.0, "label_dropout": 0.1}}


def _net():
    torch.manual_seed(0)
    net = build_denoiser(TINY, img_resolution=32, in_channels=3, label_dim=2).eval()
    for p in net.parameters():  # a zero-initialised output layer would hide every change of h
        p.data.add_(0.05 * torch.randn_like(p))
    return net.requires_grad_(False)


class Recording:
    """A denoiser that records the sigmas it is called at and returns a shrunk x."""

    def __init__(self):
        self.sigmas = []

    def __call__(self, x, sigma):
        self.sigmas.append(float(sigma[0]))
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


@pytest.mark.parametrize("cfg", [
    {"name": "edm", "num_steps": 6},
    {"name": "edm", "num_steps": 6, "solver": "euler"},
    {"name": "edm", "num_steps": 8, "s_churn": 10.0, "s_min": 0.05, "s_max": 10.0},
    {"name": "edm", "num_steps": 8, "s_churn": 40.0, "n_skipped_steps": 2},
    {"name": "dpmpp", "num_steps": 5, "order": 3},
    {"name": "ddim", "num_steps": 7, "eta": 1.0},
    {"name": "euler_ancestral", "num_steps": 7},
])
def test_evaluated_sigmas_are_the_ones_the_sampler_calls(cfg):
    rec = Recording()
    noise = IndexNoise(0, torch.arange(2), (1, 4, 4))
    sample(rec, noise, cfg, sigma_min=0.002, sigma_max=80.0)
    called = sorted({s for s in rec.sigmas}, reverse=True)
    expected = evaluated_sigmas(cfg, 0.002, 80.0)
    assert len(called) == len(expected)
    for a, b in zip(called, expected, strict=True):
        assert a == pytest.approx(b, rel=1e-6)  # the denoiser sees float32


def test_heun_evaluates_every_level_but_zero_and_churn_adds_the_raised_levels():
    plain = evaluated_sigmas({"name": "edm", "num_steps": 5}, 0.002, 80.0)
    assert len(plain) == 5 and plain[0] == 80.0 and plain[-1] == pytest.approx(0.002)
    churned = evaluated_sigmas({"name": "edm", "num_steps": 5, "s_churn": 2.0}, 0.002, 80.0)
    gamma = min(2.0 / 5, math.sqrt(2) - 1)
    assert churned[0] == pytest.approx(80.0 * (1 + gamma))
    assert len(churned) == 5 + 4  # t̂_0..t̂_4, then t_1..t_4 (the second evaluations)


def _autograd_step(h, w, b, temperature, groups, target, loss):
    h = h.clone().requires_grad_(True)
    p = torch.softmax((h @ w.T + b) / temperature, dim=1)
    n_groups = int(groups.max()) + 1
    p_hat = block_means(p, groups, n_groups)
    sizes = torch.stack([(groups == g).sum() for g in range(n_groups)]).to(torch.float32)
    total = (sizes * distribution_loss(p_hat, target.expand(n_groups, -1), loss)).sum()  # Σ_g n_g L_g
    total.backward()
    return h.grad


@pytest.mark.parametrize("loss", ["chi2", "kl"])
def test_distribution_step_equals_autograd_of_block_size_times_loss(loss):
    torch.manual_seed(1)
    n, d, v = 9, 12, 3
    h, w, b = torch.randn(n, d), torch.randn(v, d), torch.randn(v)
    groups = torch.tensor([0, 0, 1, 1, 1, 0, 2, 2, -1])  # three blocks and one padding row
    target = torch.tensor([0.2, 0.5, 0.3])
    heads = LinearHeads(w[None], b[None], torch.tensor([1.0], dtype=torch.float64))
    steer = HSpaceSteerer(heads, "distribution", scale=1.0, temperature=2.0, loss=loss,
                          targets=target.expand(1, -1))
    delta = steer.delta(h, 0, 0, groups, 3)
    ref = _autograd_step(h[:8], w, b, 2.0, groups[:8], target, loss)
    assert torch.allclose(delta[:8], -ref, atol=1e-6)
    assert torch.equal(delta[8], torch.zeros(d))  # padding is never steered


def test_sample_step_equals_autograd_and_raises_the_target_probability():
    torch.manual_seed(2)
    h, w, b = torch.randn(5, 6), torch.randn(2, 6), torch.randn(2)
    heads = LinearHeads(w[None], b[None], torch.tensor([1.0], dtype=torch.float64))
    steer = HSpaceSteerer(heads, "sample", scale=1.0, temperature=8.0, target_value=1)
    delta = steer.delta(h, 0, 0, torch.arange(5), 5)
    hh = h.clone().requires_grad_(True)
    (-torch.softmax((hh @ w.T + b) / 8.0, dim=1)[:, 1].sum()).backward()
    assert torch.allclose(delta, -hh.grad, atol=1e-7)
    before = torch.softmax((h @ w.T + b) / 8, 1)[:, 1]
    after = torch.softmax(((h + 0.5 * delta) @ w.T + b) / 8, 1)[:, 1]
    assert (after > before).all()


def test_a_block_step_depends_on_its_own_block_only():
    torch.manual_seed(3)
    h, w, b = torch.randn(8, 5), torch.randn(2, 5), torch.randn(2)
    heads = LinearHeads(w[None], b[None], torch.tensor([1.0], dtype=torch.float64))
    steer = HSpaceSteerer(heads, "distribution", scale=1.0, targets=torch.tensor([[0.5, 0.5]]))
    both = steer.delta(h, 0, 0, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), 2)
    first = steer.delta(h[:4], 0, 0, torch.zeros(4, dtype=torch.long), 1)
    second = steer.delta(h[4:], 0, 0, torch.zeros(4, dtype=torch.long), 1)
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-7)


@pytest.mark.parametrize("branches", ["all", "cond"])
def test_hook_steps_cond_rows_and_the_same_step_on_uncond_rows_for_branches_all(branches):
    torch.manual_seed(4)
    batch, shape = 3, (4, 2, 2)
    heads = LinearHeads(torch.randn(1, 2, 16), torch.randn(1, 2), torch.tensor([1.0], dtype=torch.float64))
    steer = HSpaceSteerer(heads, "distribution", scale=3.0, targets=torch.tensor([[0.5, 0.5]]), branches=branches)
    out = torch.randn(2 * batch, *shape)
    steer._active = (0, 0, torch.zeros(batch, dtype=torch.long), 1)
    new = steer.hook(None, (), out)
    cond_step = new[:batch] - out[:batch]
    expected = 3.0 * steer.delta(out[:batch].reshape(batch, -1), 0, 0, torch.zeros(batch, dtype=torch.long), 1)
    assert torch.allclose(cond_step.reshape(batch, -1), expected, atol=1e-6)
    uncond_step = new[batch:] - out[batch:]
    if branches == "all":
        assert torch.allclose(uncond_step, cond_step, atol=1e-6)
    else:
        assert torch.equal(uncond_step, torch.zeros_like(uncond_step))


def test_hspace_block_is_the_lowest_resolution_in1_and_h_has_its_shape():
    net = _net()
    block = hspace_block(net)
    assert block is net.net.dec["8x8_in1"]
    rec = HSpaceRecorder()
    with rec.attached(net):
        net(torch.zeros(2, 3, 32, 32), torch.ones(2), torch.eye(2))
    assert rec.h_shapes == [(16, 8, 8)] and rec.h[0].shape == (2, 1024)
    assert not block._forward_hooks  # detached again


@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_scale_zero_is_bit_identical_and_a_positive_scale_changes_the_samples(guidance):
    net = _net()
    cfg = {"name": "edm", "num_steps": 4}
    sigmas = evaluated_sigmas(cfg, 0.002, 80.0)
    torch.manual_seed(5)
    heads = LinearHeads(torch.randn(len(sigmas), 2, 1024), torch.zeros(len(sigmas), 2),
                        torch.tensor(sigmas, dtype=torch.float64))
    labels = torch.eye(2)[[0, 0, 0, 0]]

    def run(scale):
        noise = IndexNoise(7, torch.arange(4), (3, 32, 32))
        den = guided_denoiser(net, labels, guidance=guidance)
        if scale is None:
            return sample(den, noise, cfg, 0.002, 80.0)
        steer = HSpaceSteerer(heads, "distribution", scale=scale, targets=torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
        with steer.attached(net):
            out = sample(steer.denoiser(den, 0, torch.zeros(4, dtype=torch.long)), noise, cfg, 0.002, 80.0)
        assert steer.steered_calls == 7 and not hspace_block(net)._forward_hooks
        return out

    plain = run(None)
    assert torch.equal(run(0.0), plain)
    assert not torch.allclose(run(50.0), plain)


def test_a_sigma_without_a_head_inside_the_window_is_an_error_and_outside_is_not_steered():
    net = _net()
    heads = LinearHeads(torch.zeros(1, 2, 1024), torch.zeros(1, 2), torch.tensor([80.0], dtype=torch.float64))
    steer = HSpaceSteerer(heads, "distribution", scale=1.0, targets=torch.tensor([[0.5, 0.5]]))
    den = steer.denoiser(guided_denoiser(net, torch.eye(2)[[0]]), 0, torch.zeros(1, dtype=torch.long))
    with steer.attached(net), pytest.raises(ValueError, match="no h-space head for sigma"):
        den(torch.zeros(1, 3, 32, 32), torch.tensor([1.0]))
    steer.window = (10.0, 100.0)
    with steer.attached(net):
        den(torch.zeros(1, 3, 32, 32), torch.tensor([1.0]))  # outside the window: no head needed
        den(torch.zeros(1, 3, 32, 32), torch.tensor([80.0]))
    assert steer.steered_calls == 1


def test_steering_runs_under_bf16_autocast_and_scale_zero_matches_the_unsteered_bf16_sampler():
    from biasamp.speed import FastDenoiser

    fast = FastDenoiser(_net(), precision="bf16")
    cfg = {"name": "edm", "num_steps": 3, "solver": "euler"}
    sigmas = evaluated_sigmas(cfg, 0.002, 80.0)
    heads = LinearHeads(torch.randn(len(sigmas), 2, 1024), torch.zeros(len(sigmas), 2),
                        torch.tensor(sigmas, dtype=torch.float64))
    labels = torch.eye(2)[[1, 1]]
    noise = IndexNoise(2, torch.arange(2), (3, 32, 32))
    plain = sample(guided_denoiser(fast, labels), noise, cfg, 0.002, 80.0)
    for scale, same in ((0.0, True), (50.0, False)):
        steer = HSpaceSteerer(heads, "distribution", scale=scale, targets=torch.full((2, 2), 0.5))
        with steer.attached(fast):
            out = sample(steer.denoiser(guided_denoiser(fast, labels), 1, torch.zeros(2, dtype=torch.long)), noise,
                         cfg, 0.002, 80.0)
        assert out.dtype == torch.float32 and steer.steered_calls == 3
        assert torch.equal(out, plain) == same


def test_trace_is_the_heads_mean_probability_per_class_and_sigma_before_the_step():
    torch.manual_seed(6)
    h, w, b = torch.randn(6, 4), torch.randn(2, 4), torch.randn(2)
    heads = LinearHeads(torch.stack([w, w]), torch.stack([b, b]), torch.tensor([2.0, 1.0], dtype=torch.float64))
    steer = HSpaceSteerer(heads, "distribution", scale=1.0, temperature=4.0, targets=torch.full((2, 2), 0.5))
    groups = torch.tensor([0, 0, 0, 1, 1, -1])
    steer.delta(h, 1, 0, groups, 2)
    steer.delta(h, 0, 0, groups, 2)
    p = torch.softmax((h[:5] @ w.T + b) / 4.0, dim=1).mean(dim=0)
    (first, second) = steer.trace_table(["a", "b"])
    assert (first["class"], first["sigma"], first["rows"]) == ("a", 2.0, 5) and second["sigma"] == 1.0
    assert first["p"] == pytest.approx(p.tolist(), abs=1e-4)


def test_class_prior_enters_the_logits_of_its_class_and_a_met_target_gives_no_step():
    """Heads with zero weights and the class prior log(0.9, 0.1): at T = 1 every row's p is (0.9, 0.1), so
    chi2 to (0.9, 0.1) is 0 and h is not moved, while the uniform target moves it; another class's prior does not
    leak into class 0."""
    v, d = 2, 6
    weight = torch.zeros(1, v, d)
    weight[0, 0, 0], weight[0, 1, 0] = 1.0, -1.0
    prior = torch.log(torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
    heads = LinearHeads(weight, torch.zeros(1, v), torch.tensor([1.0], dtype=torch.float64), prior)
    assert torch.allclose(heads.logit_bias(0, 1), prior[1])
    h = torch.zeros(4, d)  # logits W h = 0: p = softmax(log prior) = the prior
    groups = torch.zeros(4, dtype=torch.long)
    met = HSpaceSteerer(heads, "distribution", 1.0, temperature=1.0, targets=torch.tensor([[0.9, 0.1], [0.5, 0.5]]))
    assert torch.allclose(met.delta(h, 0, 0, groups, 1), torch.zeros(4, d), atol=1e-7)
    assert met.trace[(0, 0)][0].tolist() == pytest.approx([3.6, 0.4])  # 4 rows of p = (0.9, 0.1)
    uniform = HSpaceSteerer(heads, "distribution", 1.0, temperature=1.0, targets=torch.full((2, 2), 0.5))
    step = uniform.delta(h, 0, 0, groups, 1)
    # by hand: u = 2 (p - t) / t = (1.6, -1.6); dL/dz = p (u - <u, p>) = (0.9 * 0.32, 0.1 * -2.88) = (0.288, -0.288)
    # dL/dh_0 = 0.288 * 1 + (-0.288) * (-1) = 0.576 per row; the step is minus that
    assert step[:, 0].tolist() == pytest.approx([-0.576] * 4, rel=1e-5)
    assert torch.count_nonzero(step[:, 1:]) == 0
    without = LinearHeads(weight, torch.zeros(1, v), heads.sigmas)
    plain = HSpaceSteerer(without, "distribution", 1.0, temperature=1.0, targets=torch.full((2, 2), 0.5))
    assert torch.count_nonzero(plain.delta(h, 0, 0, groups, 1)) == 0  # p = (0.5, 0.5): met without the prior


def _trajectories(net, batch_size, n=5, guidance=1.0):
    from biasamp.mitigation.hspace import trajectory_h
    from biasamp.oracles import ColourOracle

    oracle = ColourOracle(["red", "green"], max_distance=1000.0, min_confidence=0.0)
    cfg = {"name": "edm", "num_steps": 4}
    sigmas = evaluated_sigmas(cfg, 0.002, 80.0)
    return sigmas, trajectory_h(net, cfg, sigmas, [0, 1], n, guidance, "null", 7, batch_size, (3, 32, 32),
                                torch.device("cpu"), oracle, 0)


def test_trajectory_h_records_every_evaluation_of_each_sample_independent_of_the_batch_size():
    from biasamp.counting.job import row_seed
    from biasamp.mitigation.hspace import TRAJECTORY_OFFSET
    from biasamp.oracles import ColourOracle

    net = _net()
    sigmas, (h, ids, classes, values, valid) = _trajectories(net, batch_size=5)
    _, (h3, ids3, classes3, values3, _) = _trajectories(net, batch_size=3)
    # the sampler's own calls, counted on a recording denoiser: Heun evaluates 80 once and every later level twice
    # (the second evaluation of step i and the first of step i + 1; the last step, to 0, is Euler's)
    rec = Recording()
    sample(rec, IndexNoise(0, torch.arange(1), (1, 4, 4)), {"name": "edm", "num_steps": 4}, sigma_min=0.002,
           sigma_max=80.0)
    calls = [sum(1 for s in rec.sigmas if s == pytest.approx(level, rel=1e-6)) for level in sigmas]
    assert calls == [1, 2, 2, 2]
    for k in range(len(sigmas)):
        assert h[k].shape == (10 * calls[k], 16 * 8 * 8)  # 2 classes x 5 samples, the cond rows only
        assert sorted(ids[k].tolist()) == sorted(list(range(10)) * calls[k])
        order, order3 = torch.argsort(ids[k], stable=True), torch.argsort(ids3[k], stable=True)
        assert torch.allclose(h[k][order], h3[k][order3], atol=1e-4)  # a sample's h: its own, for any batch
    assert classes.tolist() == [0] * 5 + [1] * 5 and classes3.tolist() == classes.tolist()
    assert values.tolist() == values3.tolist() and valid.all()
    # the labels are the oracle's verdict on each sample's own final image (noise of (seed, class), offset index)
    oracle = ColourOracle(["red", "green"], max_distance=1000.0, min_confidence=0.0)
    for c in (0, 1):
        labels = torch.nn.functional.one_hot(torch.full((5,), c), 2).float()
        d = guided_denoiser(net, labels, guidance=1.0, uncond="null", interval=None, label_dim=2)
        noise = IndexNoise(row_seed(7, c), torch.arange(5) + TRAJECTORY_OFFSET, (3, 32, 32))
        with torch.no_grad():
            x = sample(d, noise, {"name": "edm", "num_steps": 4}, sigma_min=0.002, sigma_max=80.0)
        assert oracle(x.clamp(-1, 1)).bias[:, 0].tolist() == values[5 * c:5 * c + 5].tolist()
