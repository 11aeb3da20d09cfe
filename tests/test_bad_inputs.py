"""Every bad input to every app: one line on stderr naming the key or file, exit status 2, no folder written.

The apps' ``main`` functions run in this process, exactly as ``python -m biasamp.<app> <args>`` runs them
(Hydra reads the same argv), in an empty working folder; a few cases run as real subprocesses elsewhere
(tests/test_train_app.py, tests/test_count.py).
"""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

NO_CUDA = not torch.cuda.is_available()
QUICK = ["experiment=quickstart"]

# (app, arguments, a piece of the one line) — the arguments are what a user types after python -m biasamp.<app>
TRAIN = [
    (["rho=1.5"], "rho=1.5"),
    (["rho=abc"], "rho='abc'"),
    (["dataset=biased_mnist", "rho=null", *QUICK], "rho"),
    (["seed=-1"], "seed=-1"),
    (["batch_size=0"], "batch_size=0"),
    (["batch_size=64", "batch_gpu=24"], "batch_gpu"),
    (["total_kimg=0"], "total_kimg=0"),
    (["optimizer.lr=-1"], "optimizer.lr=-1"),
    (["optimizer.betas=[1.5,0.999]"], "optimizer.betas"),
    (["optimizer._target_=torch.optim.Adamm"], "torch.optim.Adamm"),
    (["+optimizer.momentumm=0.9"], "optimizer.momentumm"),
    (["loss.weighting=foo"], "loss.weighting"),
    (["loss.P_std=-1"], "loss.P_std"),
    (["loss.p2_gamma=-3"], "loss.p2_gamma"),
    (["+loss.foo=1"], "loss.foo"),
    (["ema.halflife_kimg=0"], "ema.halflife_kimg=0"),
    (["callbacks.checkpoint.ckpt_every_kimg=0"], "callbacks.checkpoint.ckpt_every_kimg=0"),
    (["+trainer.foo=1"], "trainer.foo"),
    (["+foo=1"], "foo"),
    (["trainer.precision=16-mixed"], "trainer.precision=16-mixed"),
    (["trainer.precision=bf16-true"], "trainer.precision=bf16-true"),
    (["trainer.devices=0"], "trainer.devices=0"),
    (["resume=yes"], "resume='yes'"),
    (["resume=auto", "ckpt_path=x.ckpt"], "not both"),
    (["ckpt_path=/nonexistent/x.ckpt"], "ckpt_path=/nonexistent/x.ckpt"),
    (["name="], "name="),
    (["name=../../escape"], "name='../../escape'"),
    (["name=.hidden"], "name='.hidden'"),
    (["threads=0"], "threads=0"),
    (["model.net.label_dropout=1.5"], "model.net.label_dropout=1.5"),
    (["model.net.model_channels=0", *QUICK], "model_channels"),
    (["dataset.classes_to_use=[0,12]", *QUICK], "12"),
    (["dataset.class_size=100000", *QUICK], "class_size"),
    (["dataset=waterbirds", "rho=0.95"], "experiment=paper_waterbirds"),
    (["experiment=paper_waterbirds", "trainer=cpu", "paths.data_dir=/nonexistent"], "metadata.csv"),
    (["dataset.source=torchvision", "paths.data_dir=/nonexistent", *QUICK], "train-images-idx3-ubyte"),
    (["speed.compile=maybe"], "speed.compile"),
    (["log_every_n_steps=0"], "log_every_n_steps=0"),
    (["+trainer.accumulate_grad_batches=2"], "trainer.accumulate_grad_batches"),
    (["callbacks.checkpoint.snapshot_every_min=-1"], "callbacks.checkpoint.snapshot_every_min=-1"),
    (["lr_schedule._target_=biasamp.training.schedules.Cosine"], "lr_schedule._target_"),
    (["data.on_device=maybe"], "data.on_device='maybe'"),
    (["optimizer.eps=0"], "optimizer.eps=0"),
    (["rho=-0.1"], "rho=-0.1"),
    (["batch_size=30", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=4"], "batch_size=30"),
    (["ema_loss_every_n_steps=30", "log_every_n_steps=20"], "ema_loss_every_n_steps=30"),
    (["trainer.devices=auto"], "trainer.devices='auto'"),
    (["trainer.max_time=soon"], "trainer.max_time='soon'"),
]
if NO_CUDA:
    TRAIN += [(["trainer=gpu"], "no CUDA GPU"), (["trainer.accelerator=gpu"], "no CUDA GPU")]

C = ["checkpoint={ckpt}", "n_per_class=2", "fabric.accelerator=cpu"]  # a valid count, before the bad value
COUNT = [
    ([], "checkpoint is required"),
    (["checkpoint=/nonexistent/x.ckpt"], "/nonexistent/x.ckpt does not exist"),
    (["checkpoint={junk}"], "could not be read"),
    (["checkpoint={evil}"], "holds pickled Python objects (code)"),
    (["checkpoint={empty_dir}"], "without readable checkpoints"),
    ([*C, "guidance=-1"], "guidance=-1"),
    ([*C, "guidance=inf"], "guidance=inf"),
    ([*C, "guidance=abc"], "guidance='abc'"),
    ([*C, "guidance_uncond=foo"], "guidance_uncond='foo'"),
    ([*C, "guidance_interval=[5,1]"], "guidance_interval"),
    ([*C, "sampler.num_steps=0"], "num_steps"),
    ([*C, "sampler.sigma_min=90"], "sampler.sigma_min=90"),
    ([*C, "sampler.sigma_max=200"], "sampler.sigma_max=200"),
    ([*C, "sampler.s_churn=-1"], "s_churn"),
    ([*C, "sampler.solver=rk4"], "solver"),
    ([*C, "+sampler.foo=1"], "sampler.foo"),
    ([*C, "n_per_class=0"], "n_per_class=0"),
    ([*C, "batch_size=0"], "batch_size=0"),
    ([*C, "seed=-1"], "seed=-1"),
    ([*C, "ci_level=1.5"], "ci_level=1.5"),
    ([*C, "export_matrix=foo"], "export_matrix='foo'"),
    ([*C, "classes=['7']"], "classes"),
    ([*C, "oracle.max_distance=-1"], "oracle.max_distance"),
    ([*C, "oracle=classifier"], "oracle.checkpoint"),
    ([*C, "oracle=classifier", "oracle.checkpoint=/nonexistent/oracle.ckpt"], "/nonexistent/oracle.ckpt"),
    ([*C, "class_oracle=/nonexistent/oracle.ckpt"], "class_oracle"),
    ([*C, "precision=fp16"], "precision='fp16'"),
    ([*C, "compile=maybe"], "compile='maybe'"),
    ([*C, "sweep_name=../../x"], "sweep_name='../../x'"),
    ([*C, "sweep_name="], "sweep_name="),
    ([*C, "+foo=1"], "foo"),
    ([*C, "fabric.devices=0"], "fabric.devices=0"),
]
if NO_CUDA:
    COUNT += [([*C[:2], "fabric.accelerator=gpu"], "no CUDA")]
REPORT = [
    ([], "sweep is required"),
    (["sweep=/nonexistent/sweep"], "/nonexistent/sweep"),
    (["sweep={empty_dir}"], "results.csv"),
    (["sweep={sweep}", "ci_method=foo"], "ci_method='foo'"),
    (["sweep={sweep}", "ci_level=2"], "ci_level=2"),
    (["sweep={sweep}", "formats=[gif]"], "gif"),
    (["sweep={sweep}", "out_dir={file}"], "is a file"),
    (["sweep={sweep}", "n_boot=0"], "n_boot=0"),
    (["sweep={sweep}", "+foo=1"], "foo"),
]
ORACLE = [
    (["attribute=foo"], "attribute='foo'"),
    (["name=../evil"], "name='../evil'"),
    (["lr=-1"], "lr=-1"),
    (["threads=0"], "threads=0"),
    (["rho=1.5"], "rho=1.5"),
    (["rho=null"], "rho=null"),
    (["+foo=1"], "foo"),
    (["noise_sigmas=[-1]"], "noise_sigmas"),
    (["max_steps=0"], "max_steps=0"),
    (["val_fraction=1"], "val_fraction=1"),
    (["dataset.classes_to_use=[3]"], "1 class"),
    (["dataset=multicolor_mnist", "attribute=bias"], "attribute=bias"),
]
if NO_CUDA:
    ORACLE += [(["device=cuda"], "device=cuda")]

CASES = [(app, args, needle) for app, table in (("train", TRAIN), ("count", COUNT), ("report", REPORT),
                                                ("oracle", ORACLE)) for args, needle in table]


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_checkpoint) -> dict[str, str]:
    """Files the cases point at, outside the working folder: a real checkpoint, junk, a pickle payload, an empty
    folder, a plain file, and a real count sweep (for the report)."""
    from tests.conftest import run_count

    root = tmp_path_factory.mktemp("inputs")
    (root / "junk.ckpt").write_bytes(b"not a checkpoint")
    torch.save({"biasamp_format": 1, "x": _Evil()}, root / "evil.ckpt")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("a file, not a folder\n")
    proc = run_count([f"checkpoint={tiny_checkpoint}", "n_per_class=2", "fabric.accelerator=cpu", "sweep_name=s",
                      "sampler.num_steps=2", "save_grid=false"], cwd=root / "count")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {"ckpt": str(tiny_checkpoint), "junk": str(root / "junk.ckpt"), "evil": str(root / "evil.ckpt"),
            "empty_dir": str(root / "empty"), "file": str(root / "file.txt"),
            "sweep": str(root / "count" / "runs" / "count" / "s")}


def _ids(case: tuple[str, list[str], str]) -> str:
    return f"{case[0]}:{' '.join(case[1])}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_one_line_exit_2_and_no_folder(case, inputs, tmp_path, monkeypatch, capsys):
    app, args, needle = case
    args = [a.format(**inputs) for a in args]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIASAMP_OUTPUT_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setattr(sys, "argv", [f"biasamp.{app}", *args])
    main = importlib.import_module(f"biasamp.{app}").main
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exit_.value.code == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"biasamp.{app}: error: "), err[-3000:]
    assert needle in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], sorted(tmp_path.rglob("*"))  # no run folder, no Hydra outputs/


def test_the_table_covers_at_least_forty_cases():
    assert len(CASES) >= 40
