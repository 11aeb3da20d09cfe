"""Training building blocks: EMA arithmetic, lr schedules, the index-drawn batch stream, per-rank seeding,
config checks, and a short training run whose loss falls."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn

from biasamp.data import BiasedMNIST
from biasamp.data.datamodule import InMemoryDataModule
from biasamp.data.stream import BatchStream, to_model_range
from biasamp.errors import UsageError
from biasamp.models import EDMLoss, build_denoiser, one_hot
from biasamp.training import EMA, DiffusionModule, ema_beta
from biasamp.training.config_checks import batch_layout
from biasamp.training.module import micro_batch_seed
from biasamp.training.schedules import Constant, CosineToZero, LinearRampup
from tests.conftest import compose_train

TINY = {"name": "tiny", "net": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
                                "attn_resolutions": [], "dropout": 0.0, "label_dropout": 0.1}}


# ---------------------------------------------------------------------------------------------- EMA
def test_ema_beta_half_life_arithmetic():
    # no ramp-up: after halflife_kimg*1000 images the old average keeps exactly half its weight
    beta = ema_beta(n_img=10**9, batch_total=512, halflife_kimg=150, rampup_ratio=None)
    assert beta == pytest.approx(0.5 ** (512 / 150_000), rel=1e-12)
    assert beta ** (150_000 / 512) == pytest.approx(0.5, rel=1e-9)
    # ramp-up: half-life = min(150k, n_img * 0.05)
    assert ema_beta(100_000, 512, 150, 0.05) == pytest.approx(0.5 ** (512 / 5_000), rel=1e-12)
    assert ema_beta(10**8, 512, 150, 0.05) == pytest.approx(0.5 ** (512 / 150_000), rel=1e-12)
    # at n_img = 0 the half-life is 0: the average jumps to the current weights
    assert ema_beta(0, 512, 150, 0.05) == 0.0


def test_ema_update_follows_the_closed_form():
    model = nn.Linear(3, 2)
    ema = EMA(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.zero_()
        for p in model.parameters():
            p.fill_(1.0)
    beta = 0.9
    for _ in range(7):
        ema.update(model, beta)
    # constant target 1 from start 0: p_ema = 1 - beta^k
    for p in ema.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 1 - beta**7))
    assert not any(p.requires_grad for p in ema.parameters())
    ema.train()
    assert not ema.module.training  # never in training mode


# ---------------------------------------------------------------------------------------------- lr schedules
def test_schedules():
    assert Constant()(123, 1000) == 1.0
    ramp = LinearRampup(rampup_kimg=10)
    assert ramp(0, 10**6) == 0.0
    assert ramp(5_000, 10**6) == pytest.approx(0.5)
    assert ramp(20_000, 10**6) == 1.0
    cos = CosineToZero()
    assert cos(0, 1000) == 1.0
    assert cos(500, 1000) == pytest.approx(0.5)
    assert cos(1000, 1000) == pytest.approx(0.0, abs=1e-12)
    assert cos(250, 1000) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    with pytest.raises(ValueError, match="rampup_kimg"):
        LinearRampup(rampup_kimg=-1)


# ---------------------------------------------------------------------------------------------- batch stream
def _toy_tensors(n=10):
    images = torch.arange(n, dtype=torch.uint8).reshape(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return images, torch.arange(n), torch.arange(n) % 3


def test_stream_ranks_are_disjoint_and_cover_each_epoch():
    images, labels, biases = _toy_tensors(12)
    streams = [BatchStream(images, labels, biases, batch_size=3, seed=5, rank=r, world=2) for r in range(2)]
    # one epoch = 12 items = 2 global batches of 2 ranks x 3
    seen = torch.cat([s.indices(b) for b in range(2) for s in streams])
    assert sorted(seen.tolist()) == list(range(12))
    # the batch content matches the indices
    x, y, z = streams[1].batch(1)
    idx = streams[1].indices(1)
    assert torch.equal(y, labels[idx]) and torch.equal(z, biases[idx]) and torch.equal(x, images[idx])


def test_stream_is_deterministic_and_resumable():
    images, labels, biases = _toy_tensors(10)
    a = BatchStream(images, labels, biases, batch_size=4, seed=1)
    it = iter(a)
    run = [next(it)[1] for _ in range(6)]  # crosses epoch boundaries (10 items, 4 per batch)
    assert torch.equal(next(iter(a))[1], run[0])  # a new iter() starts again at start_batch()
    resumed = BatchStream(images, labels, biases, batch_size=4, seed=1, start_batch=lambda: 3)
    it2 = iter(resumed)
    for expected in run[3:]:
        assert torch.equal(next(it2)[1], expected)
    other = BatchStream(images, labels, biases, batch_size=4, seed=2)
    assert not all(torch.equal(other.indices(b), a.indices(b)) for b in range(3))
    # every epoch is a permutation: positions 0..9 then 10..19
    flat = torch.cat([a.indices(b) for b in range(5)])
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:20].tolist()) == list(range(10))


def test_to_model_range():
    x = torch.tensor([0, 255, 128], dtype=torch.uint8)
    torch.testing.assert_close(to_model_range(x), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))


# ---------------------------------------------------------------------------------------------- seeding
def test_micro_batch_seeds_differ_by_rank_and_step_and_repeat():
    seeds = {micro_batch_seed(0, r, m) for r in range(4) for m in range(50)}
    assert len(seeds) == 200
    assert micro_batch_seed(3, 1, 7) == micro_batch_seed(3, 1, 7)
    assert 0 <= micro_batch_seed(2**31, 7, 10**9) < 2**63


# ---------------------------------------------------------------------------------------------- config checks
# (every refused value is in tests/test_bad_inputs.py, through the app)
def test_batch_layout_splits_the_global_batch():
    cfg = compose_train(["batch_size=512", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=4",
                         "batch_gpu=32"])
    assert batch_layout(cfg) == (4, 32, 4)
    cfg = compose_train(["batch_size=512", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                         "trainer.num_nodes=2"])
    assert batch_layout(cfg) == (4, 128, 1)


# ---------------------------------------------------------------------------------------------- a short run
def _fixed_loss(denoiser, x, y, seed=123):
    torch.manual_seed(seed)
    with torch.no_grad():
        was = denoiser.training
        denoiser.eval()
        loss = EDMLoss()(denoiser, x, y).mean().item()
        denoiser.train(was)
    return loss


def test_loss_falls_on_a_single_colour_toy_set(tmp_path):
    torch.manual_seed(0)
    data = BiasedMNIST(rho=1.0, classes_to_use=[0], no_digit=True, class_size=64, seed=0)
    assert torch.all(data.images[:, 0] == 255) and torch.all(data.images[:, 1:] == 0)  # all pure red
    denoiser = build_denoiser(TINY, img_resolution=32, in_channels=3, label_dim=1)
    x = to_model_range(data.images[:32])
    y = one_hot(data.labels[:32], 1)
    before = _fixed_loss(denoiser, x, y)
    module = DiffusionModule(
        denoiser=denoiser, loss=EDMLoss(), optimizer=lambda params: torch.optim.Adam(params, lr=3e-3),
        lr_schedule=Constant(), batch_total=32, total_img=32 * 60, ema_halflife_kimg=0.5,
        ema_rampup_ratio=None, seed=0, log_every_n_steps=10, ema_loss_every_n_steps=0,
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=InMemoryDataModule(data, batch_gpu=32, seed=0))
    after = _fixed_loss(module.denoiser, x, y)
    assert module.n_img == 60 * 32
    assert after < 0.5 * before, (before, after)
    assert _fixed_loss(module.ema, x, y) < before


def test_non_finite_loss_stops_the_run_with_a_clear_message(tmp_path):
    data = BiasedMNIST(rho=1.0, classes_to_use=[0], no_digit=True, class_size=16, seed=0)
    denoiser = build_denoiser(TINY, img_resolution=32, in_channels=3, label_dim=1)

    class NaNLoss(EDMLoss):
        def __call__(self, denoiser, images, class_labels):
            return super().__call__(denoiser, images, class_labels) * float("nan")

    module = DiffusionModule(
        denoiser=denoiser, loss=NaNLoss(), optimizer=lambda params: torch.optim.Adam(params, lr=1e-3),
        lr_schedule=Constant(), batch_total=8, total_img=8 * 50, ema_halflife_kimg=0.5, ema_rampup_ratio=None,
        seed=0, log_every_n_steps=5, ema_loss_every_n_steps=0, max_nonfinite_steps=10,
    )
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=50, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    from biasamp.training import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="NaN/Inf for 10 consecutive steps"):
        trainer.fit(module, datamodule=InMemoryDataModule(data, batch_gpu=8, seed=0))
    # NaN gradients were replaced (EDM): the weights stayed finite
    assert all(torch.isfinite(p).all() for p in module.denoiser.parameters())
    assert module.global_step == 10


def test_checkpoint_callback_snapshots_keeps_and_finds_the_newest(tmp_path):
    from biasamp.checkpoints import load_checkpoint
    from biasamp.training import CheckpointCallback, find_resume_checkpoint

    data = BiasedMNIST(rho=1.0, classes_to_use=[0], no_digit=True, class_size=16, seed=0)
    module = DiffusionModule(
        denoiser=build_denoiser(TINY, img_resolution=32, in_channels=3, label_dim=1), loss=EDMLoss(),
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3), lr_schedule=Constant(), batch_total=8,
        total_img=40, ema_halflife_kimg=0.5, ema_rampup_ratio=None, seed=0, ema_loss_every_n_steps=0,
        metadata={"config": {"model": TINY}, "label_dim": 1, "img_resolution": 32, "in_channels": 3,
                  "class_names": ["0"], "bias_names": ["red"], "rho_data": 1.0},
    )
    ckpt_dir = tmp_path / "checkpoints"
    callback = CheckpointCallback(ckpt_dir, ckpt_every_kimg=0.016, snapshot_every_min=1e-9)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=[callback])
    trainer.fit(module, datamodule=InMemoryDataModule(data, batch_gpu=8, seed=0))
    names = sorted(p.name for p in ckpt_dir.iterdir())
    # kept every 16 images (2 steps) and at the end (40 images); a snapshot at every step; no temporary files
    assert names == ["ckpt-0000000016.ckpt", "ckpt-0000000032.ckpt", "ckpt-0000000040.ckpt", "snapshot.ckpt"]
    assert load_checkpoint(ckpt_dir / "snapshot.ckpt")["n_img"] == 40
    assert find_resume_checkpoint(ckpt_dir).name == "ckpt-0000000040.ckpt"  # ties go to the kept one
    (ckpt_dir / "ckpt-0000000040.ckpt").unlink()
    assert find_resume_checkpoint(ckpt_dir).name == "snapshot.ckpt"
    assert find_resume_checkpoint(tmp_path / "nothing") is None
    # a corrupt newest file (a crash mid-copy) is skipped with a warning naming it, never blocking the others
    (ckpt_dir / "ckpt-0000000048.ckpt").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="ckpt-0000000048.ckpt"):
        assert find_resume_checkpoint(ckpt_dir).name == "snapshot.ckpt"
    # a write killed half-way leaves a .tmp file, removed when the next session starts
    from biasamp.training.checkpointing import remove_stale_temporaries

    (ckpt_dir / "snapshot.ckpt.tmp").write_bytes(b"half")
    assert [p.name for p in remove_stale_temporaries(ckpt_dir)] == ["snapshot.ckpt.tmp"]
    assert not list(ckpt_dir.glob("*.tmp"))


def test_corrupt_and_foreign_checkpoints_are_refused(tmp_path):
    from biasamp.checkpoints import load_checkpoint

    with pytest.raises(UsageError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(UsageError, match="could not be read"):
        load_checkpoint(tmp_path / "junk.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(UsageError, match="not a biasamp training checkpoint"):
        load_checkpoint(tmp_path / "foreign.ckpt")
    torch.save({"biasamp_format": 1, "state_dict": {}, "hyper_parameters": {"config": {}}}, tmp_path / "bare.ckpt")
    with pytest.raises(UsageError, match="lacks metadata"):
        load_checkpoint(tmp_path / "bare.ckpt")

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"biasamp_format": 1, "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(UsageError, match="holds pickled Python objects .code.*refuses to load") as err:
        load_checkpoint(tmp_path / "evil.ckpt")  # weights_only refuses to run code, and we say so plainly
    assert "weights_only=False" not in str(err.value)
