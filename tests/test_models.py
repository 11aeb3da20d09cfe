"""Tests for biasamp.models: DDPM++ structure, EDM preconditioning, loss weightings, label dropout, builder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from torch import nn
from torch.nn import functional as F

from biasamp.errors import UsageError
from biasamp.models import (
    WEIGHTINGS,
    DDPMpp,
    EDMLoss,
    EDMPrecond,
    build_denoiser,
    check_loss_config,
    check_model_config,
    loss_weight,
    null_labels,
    one_hot,
)
from biasamp.models.ddpmpp import Resample, UNetBlock, block_channels, positional_embedding

MODEL_CONF = Path(__file__).parents[1] / "conf" / "model"
PRESET_RESOLUTION = {"ddpmpp_32": 32, "ddpmpp_bmnist": 32, "ddpmpp_64": 64, "tiny": 32}
MODEL_YAMLS = sorted(MODEL_CONF.glob("*.yaml"))


def load_model_cfg(stem: str) -> dict:
    return yaml.safe_load((MODEL_CONF / f"{stem}.yaml").read_text())


def tiny_net(**overrides) -> DDPMpp:
    kwargs = dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)
    kwargs.update(overrides)
    return DDPMpp(16, 3, 3, **kwargs)


# ---------------------------------------------------------------------------------------------- structure


def test_cifar_config_param_count_matches_edm_without_augment():
    # EDM's conditional CIFAR-10 DDPM++ has 55,735,299 parameters including a 9 -> 128 bias-free augment
    # Linear (1,152); ours has no augment input.
    net = DDPMpp(32, 3, 3, label_dim=10, model_channels=128, channel_mult=(2, 2, 2), num_blocks=4,
                 attn_resolutions=(16,), dropout=0.13)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 55_735_299 - 9 * 128 == 55_734_147
    assert abs(n_params - 55.7e6) / 55.7e6 < 0.01
    # attention: the 4 encoder blocks at 16 px, the decoder's in0 at 8 px and the last decoder block at 16 px
    blocks = list(net.enc.items()) + list(net.dec.items())
    attn = [name for name, block in blocks if getattr(block, "attn", None) is not None]
    assert attn == ["16x16_block0", "16x16_block1", "16x16_block2", "16x16_block3",
                    "8x8_in0", "16x16_block4"]


def test_model_yamls_exist_and_are_named_by_stem():
    assert {p.stem for p in MODEL_YAMLS} >= set(PRESET_RESOLUTION)
    for path in MODEL_YAMLS:
        cfg = yaml.safe_load(path.read_text())
        assert cfg["name"] == path.stem
        assert set(cfg) == {"name", "img_resolution", "sigma_data", "sigma_min", "sigma_max", "net"}


@pytest.mark.parametrize("path", MODEL_YAMLS, ids=lambda p: p.stem)
def test_each_model_yaml_maps_images_to_images(path):
    torch.manual_seed(0)
    cfg = yaml.safe_load(path.read_text())
    res = cfg["img_resolution"]
    denoiser = build_denoiser(cfg, img_resolution=res, in_channels=3, label_dim=10)
    if path.stem == "ddpmpp_32":  # the yaml is EDM's conditional CIFAR-10 network
        assert sum(p.numel() for p in denoiser.parameters()) == 55_734_147
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        out = denoiser.eval()(x, torch.tensor([0.3, 20.0]), one_hot(torch.tensor([0, 7]), 10))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_fresh_network_output_is_near_zero_and_biases_start_at_zero():
    # the output conv is a "zero" layer (xavier * 1e-5), so a fresh F is ~0 and D ~ c_skip x
    torch.manual_seed(0)
    net = tiny_net(label_dim=3)
    out = net(torch.randn(4, 3, 16, 16), torch.randn(4), one_hot(torch.tensor([0, 1, 2, 0]), 3))
    assert out.abs().max() < 1e-3
    for name, p in net.named_parameters():
        if name.endswith("bias") and "norm" not in name:
            assert torch.all(p == 0), name
    qkv = net.enc["8x8_block0"].attn.qkv.weight  # (3C, C, 1, 1), C = 32
    bound = math.sqrt(0.2) * math.sqrt(6 / (32 + 96))
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound


def test_resample_with_the_1_1_filter_is_average_pooling_and_nearest_upsampling():
    x = torch.randn(2, 3, 8, 8)
    block_means = x.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))
    repeated = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        xm = x.contiguous(memory_format=memory_format)
        for mode, expected in (("down", block_means), ("up", repeated)):
            box = Resample(3, mode, (1, 1))
            assert box.box
            torch.testing.assert_close(box(xm), expected)
            box.box = False  # the depthwise-convolution route computes the same function
            torch.testing.assert_close(box(xm), expected)


def test_resample_with_a_longer_filter_convolves():
    impulse = torch.zeros(1, 1, 8, 8)
    impulse[0, 0, 4, 4] = 1.0
    f = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    down = Resample(1, "down", (1, 3, 3, 1))
    assert not down.box
    # stride 2, padding 1: output (i, j) covers input rows 2i-1 .. 2i+2, so row 4 is tap 3 of i=1, tap 1 of i=2
    expected = torch.zeros(4, 4)
    for i, ti in ((1, 3), (2, 1)):
        for j, tj in ((1, 3), (2, 1)):
            expected[i, j] = f[ti] * f[tj]
    torch.testing.assert_close(down(impulse)[0, 0], expected)
    up = Resample(1, "up", (1, 3, 3, 1))
    ones = torch.ones(1, 1, 4, 4)
    assert torch.allclose(up(ones)[0, 0, 1:-1, 1:-1], torch.ones(6, 6))  # gain 4: a constant stays constant inside


def test_unet_block_and_attention_follow_the_written_formulas():
    torch.manual_seed(0)
    block = UNetBlock(8, 16, emb_channels=12, down=True, attention=True)
    for p in block.parameters():
        nn.init.normal_(p, std=0.3)
    x, emb = torch.randn(2, 8, 8, 8), torch.randn(2, 12)
    # residual branch: resample before conv0 and before the 1x1 skip; embedding bias before the second norm
    h = block.conv0(F.avg_pool2d(F.silu(block.norm0(x)), 2))
    h = block.conv1(F.silu(block.norm1(h + block.affine(emb)[:, :, None, None])))
    y = (block.skip(F.avg_pool2d(x, 2)) + h) / math.sqrt(2)
    # single-head attention over the 16 positions: softmax_k(q . k / sqrt(C)) v, then the 1x1 projection
    q, k, v = block.attn.qkv(block.attn.norm(y)).flatten(2).chunk(3, dim=1)  # each (B, C, N)
    weights = torch.softmax(torch.einsum("bcq,bck->bqk", q, k) / math.sqrt(16), dim=2)
    a = torch.einsum("bqk,bck->bcq", weights, v).reshape(y.shape)
    expected = (y + block.attn.proj(a)) / math.sqrt(2)
    torch.testing.assert_close(block(x, emb), expected, rtol=1e-4, atol=1e-5)


def test_positional_embedding_is_sin_then_cos_with_endpoint():
    t = torch.tensor([0.7, -1.3])
    emb = positional_embedding(t, 8)  # 4 frequencies: 1, 1e-4^(1/3), 1e-4^(2/3), 1e-4
    freqs = torch.tensor([1.0, 1e-4 ** (1 / 3), 1e-4 ** (2 / 3), 1e-4])
    expected = torch.cat([torch.sin(t[:, None] * freqs), torch.cos(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)


def test_channels_last_input_gives_the_same_output_and_gradients():
    torch.manual_seed(0)
    net = tiny_net(label_dim=2)
    for p in net.parameters():  # make every layer matter, so a layout bug would show up in the output
        nn.init.normal_(p, std=0.2)
    x = torch.randn(3, 3, 16, 16)
    sigma, labels = torch.randn(3), one_hot(torch.tensor([0, 1, 1]), 2)
    ref = net(x, sigma, labels)
    net_cl = tiny_net(label_dim=2).to(memory_format=torch.channels_last)
    net_cl.load_state_dict(net.state_dict())
    out = net_cl(x.contiguous(memory_format=torch.channels_last), sigma, labels)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    out.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net_cl.parameters())


# ---------------------------------------------------------------------------------------------- labels


def test_one_hot_and_null_labels():
    y = one_hot(torch.tensor([2, 0, 1]), 3)
    assert y.dtype == torch.float32
    assert torch.equal(y, torch.tensor([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]]))
    z = null_labels(4, 3)
    assert z.shape == (4, 3) and z.dtype == torch.float32 and torch.all(z == 0)
    with pytest.raises(ValueError, match="labels"):
        one_hot(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="labels"):
        one_hot(torch.tensor([0.0, 1.0]), 3)


def _randomised_conditional_net(label_dropout: float) -> DDPMpp:
    torch.manual_seed(0)
    net = tiny_net(label_dim=3, label_dropout=label_dropout)
    for p in net.parameters():  # large random weights, so the label changes the output visibly
        nn.init.normal_(p, std=0.2)
    return net


def test_label_dropout_one_in_training_equals_the_null_input():
    net = _randomised_conditional_net(label_dropout=1.0)
    x, t = torch.randn(4, 3, 16, 16), torch.randn(4)
    labels = one_hot(torch.tensor([0, 1, 2, 1]), 3)
    net.train()
    dropped = net(x, t, labels)
    assert torch.equal(dropped, net(x, t, None))
    assert torch.equal(dropped, net(x, t, null_labels(4, 3)))
    net.eval()  # eval: label dropout is off, the label matters
    conditional = net(x, t, labels)
    assert torch.equal(net(x, t, None), dropped)  # dropout=0, so train and eval agree on the null input
    assert (conditional - dropped).abs().amax(dim=(1, 2, 3)).min() > 1e-3


def test_label_embedding_sees_one_hot_times_sqrt_label_dim():
    net = tiny_net(label_dim=3)
    seen = []
    net.map_label.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    net(torch.randn(2, 3, 16, 16), torch.randn(2), one_hot(torch.tensor([2, 0]), 3))
    torch.testing.assert_close(seen[0], torch.tensor([[0.0, 0, 1], [1, 0, 0]]) * math.sqrt(3))


def test_label_dropout_drops_whole_label_vectors_per_sample():
    net = _randomised_conditional_net(label_dropout=0.5)
    batch = 64
    x, t = torch.randn(batch, 3, 16, 16), torch.randn(batch)
    labels = one_hot(torch.arange(batch) % 3, 3)
    with torch.no_grad():
        net.eval()
        kept, null = net(x, t, labels), net(x, t, None)
        net.train()
        torch.manual_seed(1)
        mixed = net(x, t, labels)
        torch.manual_seed(1)
        again = net(x, t, labels)
    assert torch.equal(mixed, again)  # the mask comes from torch's global RNG
    is_kept = (mixed == kept).flatten(1).all(dim=1)
    is_null = (mixed == null).flatten(1).all(dim=1)
    assert torch.all(is_kept ^ is_null)  # each sample is exactly conditional or exactly unconditional
    assert 10 < int(is_null.sum()) < batch - 10


# ---------------------------------------------------------------------------------------------- precond


class ProbeNet(nn.Module):
    """F(x_in, c_noise, y) = 1 everywhere; records its inputs, so D and the c_* can be read off exactly."""

    def forward(self, x, noise_labels, class_labels=None):
        self.seen = (x, noise_labels, class_labels)
        return torch.ones_like(x)


# hand-computed for sigma_data = 0.5: sigma^2 + sigma_d^2 = 0.5 (sigma 0.5) and 4.25 (sigma 2)
HAND = {
    0.5: dict(c_skip=0.5, c_out=0.25 / math.sqrt(0.5), c_in=1 / math.sqrt(0.5), c_noise=math.log(0.5) / 4),
    2.0: dict(c_skip=0.25 / 4.25, c_out=1 / math.sqrt(4.25), c_in=1 / math.sqrt(4.25), c_noise=math.log(2) / 4),
}


@pytest.mark.parametrize("sigma", [0.5, 2.0])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_precond_coefficients_for_a_scalar_sigma(sigma, as_tensor):
    probe = ProbeNet()
    denoiser = EDMPrecond(probe, label_dim=0)
    x = torch.full((2, 1, 2, 2), 3.0)
    d = denoiser(x, torch.tensor(sigma) if as_tensor else sigma)
    c = HAND[sigma]
    x_in, c_noise, labels = probe.seen
    torch.testing.assert_close(x_in, torch.full_like(x, 3.0 * c["c_in"]))
    torch.testing.assert_close(c_noise, torch.full((2,), c["c_noise"]))
    assert labels is None  # unconditional: no label input at all
    torch.testing.assert_close(d, torch.full_like(x, 3.0 * c["c_skip"] + c["c_out"]))
    assert d.dtype == torch.float32


def test_precond_per_sample_sigma_and_null_labels():
    probe = ProbeNet()
    denoiser = EDMPrecond(probe, label_dim=3)
    x = torch.ones(2, 1, 2, 2)
    d = denoiser(x, torch.tensor([0.5, 2.0]), None)
    x_in, c_noise, labels = probe.seen
    for i, sigma in enumerate([0.5, 2.0]):
        c = HAND[sigma]
        torch.testing.assert_close(x_in[i], torch.full((1, 2, 2), c["c_in"]))
        torch.testing.assert_close(d[i], torch.full((1, 2, 2), c["c_skip"] + c["c_out"]))
        assert c_noise[i].item() == pytest.approx(c["c_noise"], rel=1e-6)
    assert c_noise.shape == (2,)
    assert torch.equal(labels, torch.zeros(2, 3))  # None -> the null (all-zero) label vector
    denoiser(x, 0.5, one_hot(torch.tensor([2, 0]), 3))
    assert torch.equal(probe.seen[2], torch.tensor([[0.0, 0, 1], [1, 0, 0]]))


def test_precond_rejects_mismatched_sigma():
    with pytest.raises(ValueError, match="sigma"):
        EDMPrecond(ProbeNet(), label_dim=0)(torch.ones(3, 1, 2, 2), torch.ones(2))


# ---------------------------------------------------------------------------------------------- loss


SIGMAS = torch.tensor([0.01, 0.5, 2.0, 80.0], dtype=torch.float64)
HAND_WEIGHTS = {
    # (s^2 + 0.25) / (0.25 s^2) = 4 + 1/s^2
    "edm": [4 + 1e4, 8.0, 4.25, 4 + 1 / 6400],
    "debias": [100.0, 2.0, 0.5, 1 / 80],
    # 1/s^2 / (1 + 1/s^2) = 1 / (1 + s^2)
    "p2": [1 / 1.0001, 0.8, 0.2, 1 / 6401],
    "min_snr": [5.0, 4.0, 0.25, 1 / 6400],
}


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_loss_weights_against_hand_computed_values(weighting):
    w = loss_weight(SIGMAS, weighting)
    assert w.shape == SIGMAS.shape
    torch.testing.assert_close(w, torch.tensor(HAND_WEIGHTS[weighting], dtype=torch.float64))


def test_loss_weight_non_default_parameters():
    s = torch.tensor([2.0], dtype=torch.float64)
    # p2 with k=0.5, gamma=0.5: 0.25 / sqrt(0.75)
    assert loss_weight(s, "p2", p2_k=0.5, p2_gamma=0.5).item() == pytest.approx(0.25 / math.sqrt(0.75))
    assert loss_weight(s, "min_snr", min_snr_gamma=0.1).item() == pytest.approx(0.1)
    assert loss_weight(s, "edm", sigma_data=1.0).item() == pytest.approx(1.25)  # (4 + 1) / 4


def test_unknown_weighting_is_rejected_at_construction():
    for make in (lambda: EDMLoss(weighting="snr"), lambda: loss_weight(torch.ones(1), "snr")):
        with pytest.raises(UsageError, match="loss.weighting") as info:
            make()
        message = str(info.value)
        assert "'snr'" in message and all(name in message for name in WEIGHTINGS)


class ZeroDenoiser:
    """D = 0, so the per-sample error is mean(y_i^2); records the sigma it was called with."""

    def __call__(self, x, sigma, class_labels):
        self.sigma, self.x, self.class_labels = sigma, x, class_labels
        return torch.zeros_like(x)


def test_loss_weights_each_sample_by_its_own_sigma():
    torch.manual_seed(0)
    # per-sample errors of D = 0 are 0, 1 and 4
    images = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.full((1, 4, 4), 2.0)])
    denoiser = ZeroDenoiser()
    loss = EDMLoss()(denoiser, images, None)
    sigma = denoiser.sigma.double()
    assert loss.shape == (3,) and loss.dtype == torch.float32
    w = 4 + sigma.pow(-2)  # EDM weight at sigma_data 0.5, by hand
    err = torch.tensor([0.0, 1.0, 4.0], dtype=torch.float64)
    torch.testing.assert_close(loss.double(), w * err, rtol=1e-5, atol=0)
    # the broadcasting bug mean(w) * mean(err) gives a different number here; make sure we are not it
    assert abs(loss.double().mean() - w.mean() * err.mean()) > 1e-3 * (w * err).mean()


def test_loss_draws_log_normal_sigma_and_unit_noise():
    torch.manual_seed(0)
    images = torch.randn(4096, 1, 4, 4)
    denoiser = ZeroDenoiser()
    labels = one_hot(torch.zeros(4096, dtype=torch.long), 2)
    EDMLoss(P_mean=-1.2, P_std=1.2)(denoiser, images, labels)
    log_sigma = denoiser.sigma.log()
    assert denoiser.sigma.shape == (4096,)
    assert abs(log_sigma.mean().item() + 1.2) < 0.06 and abs(log_sigma.std().item() - 1.2) < 0.06
    noise = (denoiser.x - images) / denoiser.sigma[:, None, None, None]
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 1) < 0.01
    assert denoiser.class_labels is labels


def test_loss_backpropagates_through_a_built_denoiser():
    torch.manual_seed(0)
    cfg = {"net": dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])}
    denoiser = build_denoiser(cfg, img_resolution=16, in_channels=3, label_dim=2)
    labels = one_hot(torch.tensor([0, 1, 0, 1]), 2)
    loss = EDMLoss(weighting="min_snr")(denoiser, torch.randn(4, 3, 16, 16), labels)
    assert loss.shape == (4,)
    loss.mean().backward()
    grads = [p.grad for p in denoiser.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------- build


def test_build_denoiser_sets_sigmas_and_label_dim():
    cfg = load_model_cfg("tiny")
    cfg.update(sigma_data=0.7, sigma_min=0.01, sigma_max=50.0)
    denoiser = build_denoiser(cfg, img_resolution=32, in_channels=1, label_dim=0)
    sigmas = (denoiser.sigma_data, denoiser.sigma_min, denoiser.sigma_max)
    assert sigmas == (0.7, 0.01, 50.0) and denoiser.label_dim == 0
    assert denoiser.net.map_label is None
    assert denoiser(torch.zeros(2, 1, 32, 32), 1.0).shape == (2, 1, 32, 32)


def test_build_denoiser_accepts_an_omegaconf_config():
    cfg = OmegaConf.load(MODEL_CONF / "tiny.yaml")
    denoiser = build_denoiser(cfg, img_resolution=32, in_channels=3, label_dim=2)
    assert denoiser.net.noise_channels == cfg.net.model_channels


@pytest.mark.parametrize(
    ("net_update", "key", "value"),
    [
        ({"model_channel": 16}, "model_channel", "model_channels"),  # typo: names key and allowed keys
        ({"model_channels": 0}, "model.net.model_channels", "0"),
        ({"num_blocks": -1}, "model.net.num_blocks", "-1"),
        ({"channel_mult": [1, 0]}, "model.net.channel_mult", "0"),
        ({"channel_mult": []}, "model.net.channel_mult", "empty"),
        ({"channel_mult_emb": 0}, "model.net.channel_mult_emb", "0"),
        ({"dropout": 1.5}, "model.net.dropout", "1.5"),
        ({"label_dropout": -0.1}, "model.net.label_dropout", "-0.1"),
        ({"attn_resolutions": [12]}, "model.net.attn_resolutions", "12"),
    ],
)
def test_build_denoiser_rejects_bad_net_config(net_update, key, value):
    cfg = load_model_cfg("tiny")
    cfg["net"].update(net_update)
    with pytest.raises(UsageError, match=key) as info:
        build_denoiser(cfg, img_resolution=32, in_channels=3, label_dim=2)
    assert value in str(info.value)


def test_build_denoiser_rejects_bad_top_level_config():
    cfg = load_model_cfg("tiny")
    with pytest.raises(UsageError, match="model.sigma_dta"):
        build_denoiser({**cfg, "sigma_dta": 0.5}, 32, 3, 2)
    with pytest.raises(UsageError, match="model.sigma_min"):
        build_denoiser({**cfg, "sigma_min": 100.0}, 32, 3, 2)
    with pytest.raises(UsageError, match="model.sigma_data"):
        build_denoiser({**cfg, "sigma_data": 0}, 32, 3, 2)
    with pytest.raises(UsageError, match="img_resolution"):
        build_denoiser(cfg, 30, 3, 2)  # three levels need a resolution divisible by 4
    with pytest.raises(UsageError, match="model.img_resolution"):
        build_denoiser({**cfg, "img_resolution": "32px"}, 32, 3, 2)
    with pytest.raises(ValueError, match="label_dim"):  # the dataset's count, not a user's value
        build_denoiser(cfg, 32, 3, -1)


@pytest.mark.parametrize(("preset", "resolution"), PRESET_RESOLUTION.items())
def test_every_model_preset_names_its_resolution_and_fits_it(preset, resolution):
    cfg = load_model_cfg(preset)
    assert cfg["img_resolution"] == resolution and cfg["name"] == preset
    sigmas, net_kwargs = check_model_config(cfg, cfg["img_resolution"])
    assert sigmas == {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0}
    assert net_kwargs["channel_mult"] == tuple(cfg["net"]["channel_mult"])


def test_check_model_config_refuses_what_the_network_would_refuse_without_building_it():
    cfg = load_model_cfg("tiny")
    for model_channels, needle in ((6, "block of 18 channels"), (10, "block of 30 channels"),  # 12 + 6, 20 + 10
                                   (3, "product \\(3\\) must be even")):
        bad = {**cfg, "net": {**cfg["net"], "model_channels": model_channels}}
        with pytest.raises(UsageError, match=f"^model.net.model_channels={model_channels} .*{needle}"):
            check_model_config(bad, 32)
        with pytest.raises(UsageError):  # and the network itself refuses the same
            DDPMpp(32, 3, 3, **{k: v for k, v in bad["net"].items()})
    with pytest.raises(UsageError, match="^img_resolution=30 does not fit model.net.channel_mult of 3 levels"):
        check_model_config(cfg, 30)


@pytest.mark.parametrize(("model_channels", "channel_mult", "num_blocks"), [(8, (1, 2, 2), 1), (16, (1, 2, 2, 2), 2),
                                                                            (12, (2, 3), 3)])
def test_block_channels_walks_the_network_as_built(model_channels, channel_mult, num_blocks):
    net = DDPMpp(32, 3, 3, model_channels=model_channels, channel_mult=channel_mult, num_blocks=num_blocks,
                 attn_resolutions=())
    built = [(b.in_channels, b.out_channels) for part in (net.enc, net.dec) for b in part.values()
             if isinstance(b, UNetBlock)]
    assert built == block_channels(model_channels, channel_mult, num_blocks)


# ---------------------------------------------------------------------------------------------- loss config


def test_check_loss_config_accepts_the_train_config():
    cfg = OmegaConf.to_container(OmegaConf.load(MODEL_CONF.parent / "train.yaml").loss)
    check_loss_config({**cfg, "sigma_data": 0.5})  # ${model.sigma_data} resolved
    check_loss_config({})  # every key defaults
    check_loss_config({"p2_gamma": 0, "p2_k": 0, "P_mean": -3})


@pytest.mark.parametrize(
    ("update", "pattern"),
    [
        ({"p2_gamma": -3}, r"^loss\.p2_gamma=-3 is not allowed: a finite number >= 0"),
        ({"p2_k": -0.5}, r"^loss\.p2_k=-0\.5 is not allowed"),
        ({"P_std": 0}, r"^loss\.P_std=0 is not allowed: a finite number > 0"),
        ({"sigma_data": -0.5}, r"^loss\.sigma_data=-0\.5 is not allowed"),
        ({"P_mean": float("nan")}, r"^loss\.P_mean=nan is not allowed: a finite number"),
        ({"P_mean": "low"}, r"^loss\.P_mean='low' is not allowed"),
        ({"min_snr_gamma": 0.0}, r"^loss\.min_snr_gamma=0\.0 is not allowed: a finite number > 0"),
        ({"weighting": "snr"}, r"^loss\.weighting='snr' is not allowed: use one of edm, debias, p2, min_snr$"),
        ({"p2_gama": 1.0}, r"^loss\.p2_gama is not a parameter of EDMLoss; allowed keys: _target_, P_mean"),
        ({"_target_": "torch.nn.MSELoss"}, r"^loss\._target_='torch\.nn\.MSELoss' is not allowed"),
    ],
)
def test_check_loss_config_refuses_bad_values_naming_the_key(update, pattern):
    cfg = {"_target_": "biasamp.models.EDMLoss", "P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5, "weighting": "p2",
           **update}
    with pytest.raises(UsageError, match=pattern) as info:
        check_loss_config(cfg)
    assert "\n" not in str(info.value)


def test_edm_loss_constructor_runs_the_same_check():
    with pytest.raises(UsageError, match=r"^loss\.p2_gamma=-3 is not allowed"):
        EDMLoss(weighting="p2", p2_gamma=-3)
    with pytest.raises(UsageError, match=r"^loss\.P_std=-1\.2"):
        EDMLoss(P_std=-1.2)
