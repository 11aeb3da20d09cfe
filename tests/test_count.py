"""The count app: file formats, exactness across batch sizes / processes / interruptions, no-op reruns,
multirun sweeps, and bad input stopped before sampling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from biasamp.checkpoints import load_checkpoint
from tests.conftest import CONF_DIR, run_count

FAST = ["n_per_class=12", "sampler.num_steps=4", "grid_per_class=3"]


def _job_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "runs" / "count").glob("*/*/state.json"))


def _one_job(cwd: Path) -> Path:
    (job,) = _job_dirs(cwd)
    return job


def compose_count(overrides: list[str]):
    import biasamp.count  # noqa: F401  (registers the folder-name resolvers)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("count", overrides=overrides)


# ---------------------------------------------------------------------------------------------- formats
def test_count_writes_pinned_formats(tiny_checkpoint, tmp_path):
    proc = run_count([f"checkpoint={tiny_checkpoint}", *FAST, "include_uncond=true", "export_matrix=wide",
                      "batch_size=5"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    job = _one_job(tmp_path)
    counts = pd.read_csv(job / "counts.csv")
    assert list(counts.columns) == ["class", "colour", "valid", "count"]
    assert list(counts["class"].astype(str).unique()) == ["0", "1", "uncond"]
    assert len(counts) == 3 * 2 * 2  # rows x colours x valid, zeros included
    assert counts.groupby("class", sort=False)["count"].sum().tolist() == [12, 12, 12]
    assert set(counts["colour"]) == {"red", "green"}

    wide = pd.read_csv(job / "counts_matrix_colour.csv")
    assert list(wide.columns) == ["class", "red", "green"]
    assert wide[["red", "green"]].sum(axis=1).tolist() == [12, 12, 12]

    meta = json.loads((job / "meta.json").read_text())
    for key in ("checkpoint", "checkpoint_sha256", "rho_data", "dataset", "sampler", "guidance", "n_per_class",
                "seed", "rows", "nfe_per_image", "wall_time_s", "images_per_s", "versions"):
        assert key in meta, key
    assert meta["sampler"]["num_steps"] == 4 and meta["nfe_per_image"] == 7  # Heun: 2N - 1, no guidance
    # batches of 5: the first batch's time (compile lands there) and the speed after it
    assert 0 < meta["first_batch_s"] < meta["wall_time_s"] and meta["steady_images_per_s"] > 0
    steady_s = meta["wall_time_s"] - meta["first_batch_s"]
    assert meta["steady_images_per_s"] == pytest.approx((36 - 5) / steady_s)
    assert "(first batch " in proc.stdout
    assert meta["rows"][0]["sample_index_range"] == [0, 12]
    assert meta["rho_data"] == pytest.approx(load_checkpoint(tiny_checkpoint)["hyper_parameters"]["rho_data"])

    results = pd.read_csv(job.parent / "results.csv")
    assert len(results) == 1
    row = results.iloc[0]
    k = int(counts[(counts["class"] == "0") & (counts["colour"] == "red")]["count"].sum()) + int(
        counts[(counts["class"] == "1") & (counts["colour"] == "green")]["count"].sum())
    assert row["n"] == 24 and row["n_aligned"] == k
    assert row["rho_model"] == pytest.approx(k / 24)
    assert row["ci_low"] <= row["rho_model"] <= row["ci_high"] and row["ci_method"] == "clopper_pearson"
    assert row["delta"] == pytest.approx(row["rho_model"] - row["rho_data"])
    assert row["sampler.num_steps"] == 4 and row["guidance"] == 0
    assert "rho_model=" in proc.stdout and "img/s" in proc.stdout

    grid = Image.open(job / "grid.png")
    assert grid.size == (3 * 34 + 2, 3 * 34 + 2)  # 3 per row, 3 rows, 32 px + 2 px padding


# ---------------------------------------------------------------------------------------------- exactness
def test_counts_identical_for_batch_sizes_7_and_64(tiny_checkpoint, tmp_path):
    for bs in (7, 64):
        proc = run_count([f"checkpoint={tiny_checkpoint}", "n_per_class=30", "sampler.num_steps=4",
                          "save_grid=false", f"batch_size={bs}", "guidance=1"], tmp_path / f"bs{bs}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _one_job(tmp_path / "bs7"), _one_job(tmp_path / "bs64")
    assert (a / "counts.csv").read_bytes() == (b / "counts.csv").read_bytes()
    assert (a / "state.json").read_bytes() == (b / "state.json").read_bytes()


def test_counts_identical_for_one_and_two_processes(tiny_checkpoint, tmp_path):
    common = [f"checkpoint={tiny_checkpoint}", "n_per_class=15", "sampler.num_steps=3", "save_grid=false",
              "batch_size=4", "fabric.accelerator=cpu"]
    one = run_count(common, tmp_path / "one")
    two = run_count([*common, "fabric.devices=2"], tmp_path / "two")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _one_job(tmp_path / "one"), _one_job(tmp_path / "two")
    assert (a / "counts.csv").read_bytes() == (b / "counts.csv").read_bytes()
    assert json.loads((b / "meta.json").read_text())["world_size"] == 2


def test_interrupted_job_resumes_to_the_uninterrupted_counts(tiny_checkpoint):
    from biasamp.checkpoints import load_denoiser
    from biasamp.counting.job import CountSetup, Row, run_rows
    from biasamp.counting.state import CountState
    from biasamp.oracles import build_oracle

    net, meta = load_denoiser(tiny_checkpoint)
    setup = CountSetup(net=net, oracle=build_oracle({"name": "colour"}, meta),
                       sampler={"name": "edm", "solver": "euler", "num_steps": 3, "sigma_min": None,
                                "sigma_max": None, "rho": 7.0, "s_churn": 20.0, "s_min": 0.0,
                                "s_max": float("inf"), "s_noise": 1.0, "n_skipped_steps": 0},
                       guidance=0.5, guidance_uncond="null", guidance_interval=None, seed=3, label_dim=2,
                       image_shape=(3, 32, 32), device=torch.device("cpu"))
    rows = [Row("0", 0), Row("1", 1), Row("uncond", None)]
    full = CountState("f", setup.count_shape)
    run_rows(setup, full, rows, n_per_class=10, batch_size=4)

    class Killed(Exception):
        pass

    def kill_after_two(state, n_new, seen=[0]):  # noqa: B006  (a counter across calls)
        seen[0] += 1
        if seen[0] == 4:  # 3 batches of row "0", then one of row "1"
            raise Killed

    part = CountState("f", setup.count_shape)
    with pytest.raises(Killed):
        run_rows(setup, part, rows, n_per_class=10, batch_size=4, on_batch=kill_after_two)
    assert part.done == {"0": 10, "1": 4}
    stats = run_rows(setup, part, rows, n_per_class=10, batch_size=4)
    assert stats.images == 6 + 10  # only the missing indices were generated
    for name in full.counts:
        assert np.array_equal(full.counts[name], part.counts[name]), name


def test_rerun_is_a_no_op_and_raising_n_samples_only_new_indices(tiny_checkpoint, tmp_path):
    args = [f"checkpoint={tiny_checkpoint}", "sampler.num_steps=3", "save_grid=false", "batch_size=8"]
    assert run_count([*args, "n_per_class=8"], tmp_path / "a").returncode == 0
    job = _one_job(tmp_path / "a")
    before = {p.name: p.stat().st_mtime_ns for p in job.iterdir()}
    again = run_count([*args, "n_per_class=8"], tmp_path / "a")
    assert again.returncode == 0 and "already complete" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in job.iterdir()} == before
    grown = run_count([*args, "n_per_class=16"], tmp_path / "a")
    assert grown.returncode == 0, grown.stderr[-2000:]
    meta = json.loads((job / "meta.json").read_text())
    assert meta["images_this_session"] == 16  # 8 new indices for each of the 2 classes
    direct = run_count([*args, "n_per_class=16"], tmp_path / "b")
    assert direct.returncode == 0
    assert (job / "counts.csv").read_bytes() == (_one_job(tmp_path / "b") / "counts.csv").read_bytes()
    assert len(pd.read_csv(job.parent / "results.csv")) == 1  # replaced, never duplicated


def test_multirun_sweep_fills_results_and_reruns_without_sampling(tiny_checkpoint, tmp_path):
    args = ["-m", f"checkpoint={tiny_checkpoint}", "sampler=edm,dpmpp", "sampler.num_steps=3",
            "guidance=0,2", "n_per_class=4", "save_grid=false"]
    first = run_count(args, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    (results_csv,) = (tmp_path / "runs" / "count").glob("*/results.csv")
    results = pd.read_csv(results_csv)
    assert len(results) == 4
    assert sorted(zip(results["sampler.name"], results["guidance"], strict=True)) == [
        ("dpmpp", 0.0), ("dpmpp", 2.0), ("edm", 0.0), ("edm", 2.0)]
    assert results["rho_model"].between(0, 1).all() and (results["n"] == 8).all()
    again = run_count(args, tmp_path)
    assert again.returncode == 0 and again.stdout.count("already complete") == 4
    assert pd.read_csv(results_csv).equals(results)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("override, needle", [
    ("guidance=-1", "guidance=-1"),
    ("sampler.num_steps=0", "sampler.num_steps"),
    ("sampler.s_churn=-5", "sampler.s_churn"),
    ("classes=[7]", "unknown class(es) ['7']"),
    ("guidance_uncond=mean", "guidance_uncond='mean'"),
    ("guidance_interval=[2,1]", "guidance_interval"),
    ("n_per_class=0", "n_per_class=0"),
    ("batch_size=0", "batch_size=0"),
    ("batch_size=big", "or auto"),
    ("oracle.allowed_colours=[blue]", "lacks the checkpoint's bias colour"),
])
def test_bad_settings_are_named_before_sampling(tiny_checkpoint, override, needle):
    from biasamp.count import check_and_plan

    cfg = compose_count([f"checkpoint={tiny_checkpoint}", override])
    with pytest.raises(ValueError) as err:
        check_and_plan(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_bad_checkpoints_are_refused(tiny_checkpoint, tmp_path):
    from biasamp.count import check_and_plan

    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    ckpt = load_checkpoint(tiny_checkpoint)
    no_ema = {**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema.")}}
    torch.save(no_ema, tmp_path / "no_ema.ckpt")
    hp = {**ckpt["hyper_parameters"]}
    hp["config"] = {**hp["config"], "dataset": {**hp["config"]["dataset"], "name": "waterbirds"}}
    torch.save({**ckpt, "hyper_parameters": hp}, tmp_path / "other_data.ckpt")
    no_meta = {k: v for k, v in ckpt.items() if k != "hyper_parameters"}
    torch.save(no_meta, tmp_path / "no_meta.ckpt")
    cases = [(tmp_path / "missing.ckpt", "checkpoint not found"), (corrupt, "could not be read"),
             (tmp_path / "no_ema.ckpt", "no EMA weights"), (tmp_path / "other_data.ckpt", "does not fit dataset"),
             (tmp_path / "no_meta.ckpt", "lacks metadata")]
    for path, needle in cases:
        with pytest.raises((ValueError, FileNotFoundError)) as err:
            check_and_plan(compose_count([f"checkpoint={path}"]))
        assert needle in str(err.value), (path, str(err.value))


def test_cli_bad_input_is_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    proc = run_count([f"checkpoint={tiny_checkpoint}", "guidance=-0.5"], tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("biasamp.count: error: guidance=-0.5 is not allowed")
    assert not list((tmp_path / "runs").glob("count/*/*/state.json"))


def test_a_run_folder_names_its_latest_checkpoint(tiny_checkpoint, tmp_path):
    from biasamp.checkpoints import resolve_checkpoint
    from biasamp.count import ckpt_name

    run_dir = tiny_checkpoint.parent.parent
    assert resolve_checkpoint(run_dir) == tiny_checkpoint
    assert resolve_checkpoint(run_dir / "checkpoints") == tiny_checkpoint
    assert ckpt_name(run_dir) == ckpt_name(tiny_checkpoint) == f"tiny2-{tiny_checkpoint.stem}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="without checkpoints"):
        resolve_checkpoint(tmp_path / "empty")
