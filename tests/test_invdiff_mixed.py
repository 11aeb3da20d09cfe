"""InvDiff's mixed network: a zeroed side network gives exactly (1 - r) F_frozen (convex) or F_frozen (residual),
r = 0 is the base model, the base never trains and sees the same dropped labels as Delta, bad r / mix / shapes are
refused with one line, and a mixed checkpoint loads through the usual loader."""

from __future__ import annotations

import pytest
import torch

from biasamp.errors import UsageError
from biasamp.models.build import build_denoiser, build_mixed_denoiser
from biasamp.models.ddpmpp import DDPMpp
from biasamp.models.mixed import MixedNet, check_mix

TINY = {"name": "tiny", "sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0,
        "net": {"model_channels": 8, "channel_mult": [1, 2, 2], "channel_mult_emb": 4, "num_blocks": 1,
                "attn_resolutions": [], "dropout": 0.0, "label_dropout": 0.1}}


def _base():
    torch.manual_seed(0)
    base = build_denoiser(TINY, 32, 3, 2)
    for p in base.parameters():  # away from the zero-initialised output layer
        p.data.add_(0.05 * torch.randn_like(p))
    return base.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 32, 32, generator=g)
    c_noise = torch.tensor([0.5, 2.0, 10.0]).log() / 4
    y = torch.nn.functional.one_hot(torch.tensor([0, 1, 0]), 2).float()
    return x, c_noise, y


@pytest.mark.parametrize("mix, r", [("convex", 0.8), ("convex", -0.5), ("convex", 1.0), ("residual", 0.8),
                                    ("residual", 0.0), ("convex", 0.0)])
def test_a_zeroed_delta_gives_one_minus_r_times_the_base_or_the_base_exactly(mix, r):
    base = _base()
    mixed = build_mixed_denoiser(TINY, 32, 3, 2, r, mix, base_state=base.state_dict()).eval()
    x, c_noise, y = _inputs()
    with torch.no_grad():
        f_base = base.net(x, c_noise, y)
        f_mix = mixed.net(x, c_noise, y)
        assert torch.count_nonzero(mixed.net.delta(x, c_noise, y)) == 0
    expected = (1.0 - r) * f_base if mix == "convex" and r != 0 else f_base
    assert torch.equal(f_mix, expected)
    if mix == "residual" or r == 0:  # the same denoiser D as the base model, bit for bit
        assert torch.equal(mixed(x, torch.tensor([0.5, 2.0, 10.0]), y), base(x, torch.tensor([0.5, 2.0, 10.0]), y))


def test_delta_is_a_copy_of_the_base_or_a_narrower_fresh_net_and_only_delta_trains():
    base = _base()
    copy = build_mixed_denoiser(TINY, 32, 3, 2, 0.8, base_state=base.state_dict())
    frozen, delta = copy.net.frozen, copy.net.delta
    for (name, p), q in zip(frozen.named_parameters(), delta.parameters(), strict=True):
        if name.startswith("out_conv"):
            assert torch.count_nonzero(q) == 0
        else:
            assert torch.equal(p, q)  # the released DELTA_TYPE=pretrain: a deep copy of the base
    assert not any(p.requires_grad for p in frozen.parameters()) and all(p.requires_grad for p in delta.parameters())
    narrow = build_mixed_denoiser(TINY, 32, 3, 2, 0.8, delta_channels=4, base_state=base.state_dict())
    assert narrow.net.delta.enc["32x32_conv"].weight.shape[0] == 4
    assert sum(p.numel() for p in narrow.net.delta.parameters()) < sum(p.numel() for p in frozen.parameters())
    # a training step moves Delta only
    copy.train()
    assert not copy.net.frozen.training and copy.net.delta.training
    before = {k: v.clone() for k, v in copy.state_dict().items()}
    opt = torch.optim.SGD([p for p in copy.parameters() if p.requires_grad], lr=0.1)
    x, _, y = _inputs()
    loss = (copy(x, torch.tensor([0.5, 2.0, 10.0]), y) - x).square().mean()
    loss.backward()
    opt.step()
    after = copy.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("net.delta.") for k in changed)
    assert any(k.startswith("net.delta.out_conv") for k in changed)


def test_label_dropout_drops_the_same_rows_in_both_networks():
    frozen = DDPMpp(32, 3, 3, label_dim=2, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1,
                    attn_resolutions=(), dropout=0.0, label_dropout=0.0)
    seen = {}

    def record(name):
        def hook(module, args):
            seen[name] = args[2].clone()
        return hook

    delta = DDPMpp(32, 3, 3, label_dim=2, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1,
                   attn_resolutions=(), dropout=0.0, label_dropout=0.3)
    net = MixedNet(frozen, delta, 0.8, label_dropout=0.5).train()
    assert frozen.label_dropout == 0 and delta.label_dropout == 0  # one draw, in MixedNet
    frozen.register_forward_pre_hook(record("frozen"))
    delta.register_forward_pre_hook(record("delta"))
    y = torch.nn.functional.one_hot(torch.arange(64) % 2, 2).float()
    torch.manual_seed(3)
    net(torch.zeros(64, 3, 32, 32), torch.zeros(64), y)
    assert torch.equal(seen["frozen"], seen["delta"])
    dropped = (seen["frozen"].sum(dim=1) == 0).float().mean()
    assert 0.3 < dropped < 0.7  # about half of 64 rows


@pytest.mark.parametrize("r, mix, needle", [(1.5, "convex", "invdiff.r=1.5 is not allowed"),
                                            (-1.0, "convex", "invdiff.r=-1.0 is not allowed"),
                                            (0.5, "sum", "invdiff.mix='sum' is not allowed")])
def test_bad_r_and_mix_are_one_line(r, mix, needle):
    with pytest.raises(UsageError) as err:
        check_mix(r, mix)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_a_delta_of_another_shape_is_refused():
    a = DDPMpp(32, 3, 3, label_dim=2, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=())
    b = DDPMpp(32, 3, 3, label_dim=3, model_channels=8, channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=())
    with pytest.raises(UsageError, match="must match the base checkpoint's shape"):
        MixedNet(a, b, 0.8)


def test_a_mixed_checkpoint_loads_through_the_usual_loader(tiny_checkpoint, tmp_path):
    from biasamp.checkpoints import EMA_PREFIX, ema_state_dict, load_checkpoint, load_denoiser

    ckpt = load_checkpoint(tiny_checkpoint)
    base, meta = load_denoiser(tiny_checkpoint)
    cfg = meta["config"]
    mixed = build_mixed_denoiser(cfg["model"], meta["img_resolution"], meta["in_channels"], meta["label_dim"], 0.8,
                                 base_state=ema_state_dict(ckpt))
    with torch.no_grad():
        for p in mixed.net.delta.parameters():
            p.add_(0.01)
    ckpt = dict(ckpt)
    ckpt["hyper_parameters"] = {**ckpt["hyper_parameters"],
                                "config": {**cfg, "invdiff": {"r": 0.8, "mix": "convex", "delta_channels": None}}}
    ckpt["state_dict"] = {EMA_PREFIX + k: v for k, v in mixed.state_dict().items()}
    torch.save(ckpt, tmp_path / "mixed.ckpt")
    loaded, _ = load_denoiser(tmp_path / "mixed.ckpt")
    assert isinstance(loaded.net, MixedNet) and loaded.net.r == 0.8
    x = torch.randn(2, meta["in_channels"], meta["img_resolution"], meta["img_resolution"])
    y = torch.nn.functional.one_hot(torch.tensor([0, 1]), meta["label_dim"]).float()
    with torch.no_grad():
        assert torch.equal(loaded(x, torch.tensor([1.0, 5.0]), y), mixed.eval()(x, torch.tensor([1.0, 5.0]), y))
        assert not torch.equal(loaded(x, torch.tensor([1.0, 5.0]), y), base(x, torch.tensor([1.0, 5.0]), y))


@pytest.mark.slow  # the default suite runs make mitigation-invdiff SMOKE=1 (tests/test_experiments.py) instead
def test_invdiff_fine_tuning_trains_delta_only_and_the_mixed_checkpoint_counts(tiny_checkpoint, tmp_path):
    """groups app -> train experiment=invdiff (3 steps) -> the checkpoint: the frozen base equals the base's EMA
    weights, Delta moved, the identity holds both files' sha256, the dataset is the base's; it counts through the
    count app; groups of another checkpoint are refused with one line."""
    import glob
    import json

    from biasamp.checkpoints import ema_state_dict, load_checkpoint, metadata
    from biasamp.counting.plan import sha256_file
    from tests.conftest import run_app, run_count, run_train

    groups = run_app("invdiff_groups", [f"checkpoint={tiny_checkpoint}", "steps=20", "n_sigma=2", "name=g"], tmp_path)
    assert groups.returncode == 0, groups.stderr[-3000:]
    path = tmp_path / "runs" / "invdiff" / "g" / "groups.pt"
    args = ["experiment=invdiff", f"invdiff.base={tiny_checkpoint}", f"invdiff.groups={path}", "trainer=cpu",
            "trainer.max_steps=3", "batch_size=16", "name=inv", "dataset=waterbirds"]  # dataset: the base's wins
    proc = run_train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ckpt,) = glob.glob(str(tmp_path / "runs" / "train" / "inv-*" / "checkpoints" / "ckpt-*.ckpt"))
    state, base = ema_state_dict(load_checkpoint(ckpt)), ema_state_dict(load_checkpoint(tiny_checkpoint))
    for key, value in base.items():
        if key.startswith("net."):
            assert torch.equal(state["net.frozen." + key[4:]], value), key
    assert torch.count_nonzero(state["net.delta.out_conv.weight"]) > 0  # Delta left its zero output
    meta = metadata(load_checkpoint(ckpt))
    assert meta["config"]["dataset"] == metadata(load_checkpoint(tiny_checkpoint))["config"]["dataset"]
    assert meta["identity"]["invdiff.base_sha256"] == sha256_file(tiny_checkpoint)
    assert meta["identity"]["invdiff.groups_sha256"] == sha256_file(path)
    assert "invdiff.base" not in meta["identity"] and meta["identity"]["invdiff.r"] == 0.8
    count = run_count([f"checkpoint={ckpt}", "sampler.num_steps=4", "n_per_class=4", "save_grid=false"], tmp_path)
    assert count.returncode == 0, count.stderr[-3000:]
    (job,) = glob.glob(str(tmp_path / "runs" / "count" / "*" / "*" / "meta.json"))
    assert json.loads(open(job).read())["identity"]["checkpoint_sha256"] == sha256_file(ckpt)
    # refusals, in process (the app turns a UsageError into one line and exit 2: tests/test_bad_inputs.py)
    from biasamp.errors import UsageError
    from biasamp.training.config_checks import check_train_config
    from biasamp.training.fit import setup
    from tests.conftest import compose_train

    other = compose_train(["experiment=invdiff", f"invdiff.base={ckpt}", f"invdiff.groups={path}", "trainer=cpu",
                           "trainer.max_steps=3", "batch_size=16", "name=bad"], tmp_path / "bad")
    with pytest.raises(UsageError, match="were made for another checkpoint") as err:
        setup(other, tmp_path / "bad")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="invdiff.lam=-1 is not allowed"):
        check_train_config(compose_train([*args[:3], "invdiff.lam=-1"], tmp_path / "bad2"))
    with pytest.raises(UsageError, match="invdiff.r=1.5 is not allowed"):
        check_train_config(compose_train([*args[:3], "invdiff.r=1.5"], tmp_path / "bad3"))
