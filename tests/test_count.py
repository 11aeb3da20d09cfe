"""The count app: file formats, exactness across batch sizes / processes / interruptions, no-op reruns,
multirun sweeps, job identity and locking, restoring files from the state, and bad input stopped before any
folder or model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from biasamp.analysis import rho_model_from_counts
from biasamp.checkpoints import load_checkpoint
from biasamp.counting.counts import write_matrices
from biasamp.errors import UsageError
from tests.conftest import CONF_DIR, run_count

FAST = ["n_per_class=12", "sampler.num_steps=4", "grid_per_class=3"]


def _job_dirs(cwd: Path) -> list[Path]:
    return sorted(p.parent for p in (cwd / "runs" / "count").glob("*/*/state.json"))


def _one_job(cwd: Path) -> Path:
    (job,) = _job_dirs(cwd)
    return job


def compose_count(overrides: list[str]):
    import biasamp.counting  # noqa: F401  (registers the sweep-name resolver)

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
    assert sorted(meta) == sorted([
        "checkpoint", "checkpoint_sha256", "checkpoint_finished", "allow_unfinished", "run", "n_img_trained",
        "dataset", "dataset_summary", "rho_data", "rho_data_by_attribute", "class_names", "model", "sampler",
        "guidance", "guidance_uncond", "guidance_interval", "oracle", "class_oracle", "steering", "precision",
        "seed", "n_per_class", "rows", "identity", "identity_hash", "nfe_per_image", "wall_time_s",
        "images_this_session", "images_per_s", "first_batch_s", "steady_images_per_s", "batch_size", "world_size",
        "device", "versions", "finished_at", "rho_model", "rho_model_by_attribute", "summary"])
    assert job.name.endswith("-" + meta["identity_hash"]) and meta["identity"]["checkpoint_sha256"] == \
        meta["checkpoint_sha256"] and "checkpoint" not in meta["identity"]
    assert sorted(json.loads((job / "state.json").read_text())) == [
        "batch_size", "counts", "done", "identity", "nfe_per_image", "shape"]
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
    assert list(results.columns) == [
        "job_dir", "run", "mitigation", "checkpoint", "train_seed", "train_config", "n_img", "dataset", "attribute",
        "rho_data", "sampler.name", "sampler.solver",
        "sampler.num_steps", "sampler.sigma_min", "sampler.sigma_max", "sampler.rho", "sampler.s_churn",
        "sampler.s_min", "sampler.s_max", "sampler.s_noise", "sampler.n_skipped_steps", "guidance",
        "guidance_uncond", "guidance_interval", "oracle", "oracle_options", "class_oracle", "precision", "seed",
        "n_per_class", "n",
        "n_aligned", "rho_model", "ci_low", "ci_high", "ci_method", "ci_level", "delta", "n_invalid",
        "rho_model_valid", "nfe", "images_per_s"]
    row = results.iloc[0]
    k = int(counts[(counts["class"] == "0") & (counts["colour"] == "red")]["count"].sum()) + int(
        counts[(counts["class"] == "1") & (counts["colour"] == "green")]["count"].sum())
    assert row["n"] == 24 and row["n_aligned"] == k
    assert row["rho_model"] == pytest.approx(k / 24)
    assert row["ci_low"] <= row["rho_model"] <= row["ci_high"] and row["ci_method"] == "clopper_pearson"
    assert row["delta"] == pytest.approx(row["rho_model"] - row["rho_data"])
    assert row["sampler.num_steps"] == 4 and row["guidance"] == 0
    # what tells models and oracles apart: the training seed, the seed-free training identity, resolved options
    hp = load_checkpoint(tiny_checkpoint)["hyper_parameters"]
    assert row["train_seed"] == hp["config"]["seed"] and len(row["train_config"]) == 8
    assert row["n_img"] == load_checkpoint(tiny_checkpoint)["n_img"]
    assert json.loads(row["oracle_options"]) == {"allowed_colours": ["red", "green"], "max_distance": 80.0,
                                                 "min_confidence": 0.2}
    assert row["precision"] == "fp32"
    assert "rho_model=" in proc.stdout and "img/s" in proc.stdout

    grid = Image.open(job / "grid.png")
    assert grid.size == (3 * 34 + 2, 3 * 34 + 2)  # 3 per row, 3 rows, 32 px + 2 px padding


def test_seed_matrix_reads_back_by_the_seed_rule(tmp_path):
    # K = 3 classes x 3 colours (valid and invalid rows), then the uncond row; asymmetric so a shifted column shows
    classes, colours = ["0", "1", "2"], ["red", "green", "blue"]
    hits = {"0": [7, 2, 1], "1": [3, 11, 0], "2": [4, 5, 9], "uncond": [6, 6, 8]}  # per colour, valid + invalid
    records = []
    for row, per_colour in hits.items():
        for colour, n in zip(colours, per_colour, strict=True):
            records += [(row, colour, True, n - n // 3), (row, colour, False, n // 3)]
    table = pd.DataFrame.from_records(records, columns=["class", "colour", "valid", "count"])
    (path,) = write_matrices(tmp_path, table, ["colour"], [colours], [*classes, "uncond"], "seed")
    text = path.read_text()
    assert text.splitlines()[0] == "7,2,1,0"  # no header, no class column, the legacy zero column last
    m = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    assert m.shape == (4, 4) and (m[:, 3] == 0).all() and m[3, :3].tolist() == [6, 6, 8]
    k = len(classes)
    rho_seed = np.trace(m[:k, :k]) / m[:k].sum()  # the seed's rule; the uncond row (last) excluded
    assert rho_seed == pytest.approx((7 + 11 + 9) / (10 + 14 + 18), abs=1e-15)
    assert rho_seed == pytest.approx(rho_model_from_counts(table, classes, colours, "colour").rho_model, abs=1e-15)


# ---------------------------------------------------------------------------------------------- exactness
def test_counts_identical_for_batch_sizes_7_and_64(tiny_checkpoint, tmp_path):
    for bs in (7, 64):
        proc = run_count([f"checkpoint={tiny_checkpoint}", "n_per_class=30", "sampler.num_steps=4",
                          "save_grid=false", f"batch_size={bs}", "guidance=1"], tmp_path / f"bs{bs}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _one_job(tmp_path / "bs7"), _one_job(tmp_path / "bs64")
    assert (a / "counts.csv").read_bytes() == (b / "counts.csv").read_bytes()
    state_a, state_b = (json.loads((j / "state.json").read_text()) for j in (a, b))
    assert (state_a.pop("batch_size"), state_b.pop("batch_size")) == (7, 64)  # recorded: auto keeps it on resume
    assert state_a == state_b


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
    files = [*(job / name for name in ("state.json", "counts.csv", "meta.json")), job.parent / "results.csv"]
    before = [p.stat().st_mtime_ns for p in files]
    again = run_count([*args, "n_per_class=8"], tmp_path / "a")
    assert again.returncode == 0 and "already complete" in again.stdout
    assert [p.stat().st_mtime_ns for p in files] == before  # (only the lock file is touched)
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
    ("guidance=inf", "guidance=inf is not allowed"),
    ("sampler.sigma_min=90", "sampler.sigma_min=90"),
    ("sampler.sigma_max=200", "model's sigma range [0.002, 80]"),
    ("sweep_name=../../x", "sweep_name='../../x'"),
    ("include_uncond=maybe", "include_uncond='maybe'"),
    ("guidance_uncond=mean", "guidance_uncond='mean'"),
    ("guidance_interval=[2,1]", "guidance_interval"),
    ("n_per_class=0", "n_per_class=0"),
    ("batch_size=0", "batch_size=0"),
    ("batch_size=big", "or auto"),
])
def test_bad_settings_are_named_before_sampling(tiny_checkpoint, override, needle):
    cfg = compose_count([f"checkpoint={tiny_checkpoint}", override])
    with pytest.raises(UsageError) as err:
        plan(cfg)
    assert needle in str(err.value) and "\n" not in str(err.value)


def plan(cfg):
    from biasamp.counting.plan import plan_job
    from biasamp.counting.schema import check_count_config

    return plan_job(check_count_config(cfg))


def test_bad_checkpoints_are_refused(tiny_checkpoint, tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(tiny_checkpoint.read_bytes()[:5000])
    ckpt = load_checkpoint(tiny_checkpoint)
    no_ema = {**ckpt, "state_dict": {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema.")}}
    torch.save(no_ema, tmp_path / "no_ema.ckpt")
    no_meta = {k: v for k, v in ckpt.items() if k != "hyper_parameters"}
    torch.save(no_meta, tmp_path / "no_meta.ckpt")
    cases = [(tmp_path / "missing.ckpt", "does not exist"), (corrupt, "could not be read"),
             (tmp_path / "no_ema.ckpt", "no EMA weights"), (tmp_path / "no_meta.ckpt", "lacks metadata")]
    for path, needle in cases:
        with pytest.raises(UsageError) as err:
            plan(compose_count([f"checkpoint={path}"]))
        assert needle in str(err.value), (path, str(err.value))


def test_cli_bad_input_is_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    proc = run_count([f"checkpoint={tiny_checkpoint}", "guidance=-0.5"], tmp_path)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("biasamp.count: error: guidance=-0.5 is not allowed")
    assert not list((tmp_path / "runs").glob("count/*/*/state.json"))


def test_a_run_folder_names_its_latest_checkpoint(tiny_checkpoint, tmp_path):
    from biasamp.checkpoints import resolve_checkpoint
    from biasamp.counting.names import sweep_name

    run_dir = tiny_checkpoint.parent.parent
    assert resolve_checkpoint(run_dir) == tiny_checkpoint
    assert resolve_checkpoint(run_dir / "checkpoints") == tiny_checkpoint
    assert sweep_name(run_dir) == sweep_name(tiny_checkpoint) == f"{run_dir.name}-{tiny_checkpoint.stem}"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="without readable checkpoints"):
        resolve_checkpoint(tmp_path / "empty")
    assert sweep_name(tmp_path / "empty") == "empty" and sweep_name(None) == "no_checkpoint"  # never raises


def _error_line(proc) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("biasamp.count: error: "), proc.stderr
    return lines[0]


def test_cli_refusals_leave_no_folder(tiny_checkpoint, tmp_path):
    """No checkpoint, an infinite guidance, a sigma outside the model's range, a sweep name that leaves the
    output folder, a GPU that is not there: one line, exit 2, and nothing written (not even the sweep folder)."""
    import torch

    ckpt = f"checkpoint={tiny_checkpoint}"
    cases = [([], "checkpoint is required: python -m biasamp.count checkpoint=<ckpt file"),
             ([ckpt, "guidance=inf"], "guidance=inf is not allowed"),
             ([ckpt, "sampler.sigma_min=90"], "sampler.sigma_min=90 is not allowed"),
             ([ckpt, "sweep_name=../../x"], "sweep_name='../../x' is not allowed")]
    if not torch.cuda.is_available():
        cases.append(([ckpt, "fabric.accelerator=gpu"], "this machine has no CUDA GPU"))
    for args, needle in cases:
        proc = run_count(args, tmp_path / "cwd")
        assert needle in _error_line(proc), (args, proc.stderr)
        assert list((tmp_path / "cwd").iterdir()) == [], args


def _modified_checkpoint(tiny_checkpoint: Path, path: Path, n_img: int | None = None, **hp) -> Path:
    ckpt = load_checkpoint(tiny_checkpoint)
    torch.save({**ckpt, "n_img": ckpt["n_img"] if n_img is None else n_img,
                "hyper_parameters": {**ckpt["hyper_parameters"], **hp}}, path)
    return path


def test_unfinished_checkpoint_needs_allow_unfinished(tiny_checkpoint, tmp_path):
    path = _modified_checkpoint(tiny_checkpoint, tmp_path / "half.ckpt", n_img=32)
    with pytest.raises(UsageError, match="is unfinished .* allow_unfinished=true"):
        plan(compose_count([f"checkpoint={path}"]))
    assert plan(compose_count([f"checkpoint={path}", "allow_unfinished=true"])).meta["finished"] is False


def test_guidance_needs_a_checkpoint_trained_with_label_dropout(tiny_checkpoint, tmp_path):
    path = _modified_checkpoint(tiny_checkpoint, tmp_path / "no_null.ckpt", label_dropout=0.0)
    for override, needle in (("guidance=1", "guidance=1.0 is not allowed"),
                             ("include_uncond=true", "include_uncond=True is not allowed")):
        with pytest.raises(UsageError) as err:
            plan(compose_count([f"checkpoint={path}", override]))
        assert needle in str(err.value) and "label_dropout=0" in str(err.value)
    assert plan(compose_count([f"checkpoint={path}", "guidance=0"])).settings.guidance == 0


def test_identity_is_the_checkpoint_content_and_the_oracle_file_content(tiny_checkpoint, tmp_path):
    """The job folder follows the checkpoint's sha256, not its path; an oracle file replaced under the same
    path is another identity; settings that change no count are not part of it."""
    from biasamp.counting.plan import _oracle_identity

    copy = tmp_path / "elsewhere" / "renamed.ckpt"
    copy.parent.mkdir()
    copy.write_bytes(tiny_checkpoint.read_bytes())
    a = plan(compose_count([f"checkpoint={tiny_checkpoint}"]))
    assert plan(compose_count([f"checkpoint={copy}", "n_per_class=7", "batch_size=3", "ci_level=0.9"])).job_name \
        == a.job_name
    assert plan(compose_count([f"checkpoint={tiny_checkpoint}", "seed=1"])).job_name != a.job_name
    assert a.job_name.startswith("edm-heun-steps18-churn0-w0-")

    class Fake:
        attributes, value_names, min_confidence = ["colour"], [["red", "green"]], 0.0

    oracle_file = tmp_path / "oracle.ckpt"
    oracle_file.write_bytes(b"first classifier")
    first = _oracle_identity({"name": "classifier", "checkpoint": str(oracle_file)}, Fake())
    oracle_file.write_bytes(b"retrained classifier")
    second = _oracle_identity({"name": "classifier", "checkpoint": str(oracle_file)}, Fake())
    assert first["checkpoint_sha256"] != second["checkpoint_sha256"]


def test_a_job_folder_is_continued_only_under_its_identity(tiny_checkpoint, tmp_path):
    from biasamp.counting.runner import start_state
    from biasamp.counting.state import CountState

    p = plan(compose_count([f"checkpoint={tiny_checkpoint}", "n_per_class=4"]))
    job = tmp_path / p.job_name
    job.mkdir()
    old = {**p.identity, "oracle.checkpoint_sha256": "0" * 64}  # the job of a since-replaced oracle file
    CountState(old, (2, 2), done={"0": 2}, counts={"0": np.array([[1, 1], [0, 0]])}).save(job)
    with pytest.raises(UsageError) as err:
        start_state(p, job)
    assert "oracle.checkpoint_sha256 is '0000" in str(err.value) and "\n" not in str(err.value)
    CountState(p.identity, (2, 2), done={"0": 6}, counts={"0": np.array([[3, 3], [0, 0]])}).save(job)
    with pytest.raises(UsageError, match=r"n_per_class=4 is below the samples already counted .* n_per_class>=6"):
        start_state(p, job)
    state = start_state(plan(compose_count([f"checkpoint={tiny_checkpoint}", "n_per_class=8"])), job)
    assert state.done == {"0": 6}


@pytest.mark.parametrize("text, needle", [
    ('{"identity": {}, "shape": [2, 2], "done": {"0"', "not valid JSON"),
    ('{"fingerprint": "abc", "shape": [2, 2], "done": {}, "counts": {}}', "keys ['counts', 'done', 'fingerprint'"),
    ('{"identity": {}, "shape": [2, 2], "done": {"0": 4}, "counts": {"0": [1, 3]}, "batch_size": null, '
     '"nfe_per_image": null}', "row '0' does not hold 4 whole counts"),
])
def test_malformed_state_is_one_line_naming_the_file(tmp_path, text, needle):
    from biasamp.counting.state import read_state

    (tmp_path / "state.json").write_text(text)
    with pytest.raises(UsageError) as err:
        read_state(tmp_path)
    message = str(err.value)
    assert str(tmp_path / "state.json") in message and needle in message and "delete it" in message
    assert "\n" not in message


def test_auto_batch_size_of_a_resumed_job_is_the_one_it_started_with(tiny_checkpoint):
    from biasamp.counting.runner import _batch_size
    from biasamp.counting.state import CountState

    p = plan(compose_count([f"checkpoint={tiny_checkpoint}", "batch_size=auto"]))
    state = CountState(p.identity, (2, 2), batch_size=192)
    assert _batch_size(p, state, net=None, fabric=None, world=1, image_shape=(3, 32, 32)) == 192


def test_lock_lost_row_and_copied_run_folder(tiny_checkpoint, tmp_path):
    """A second process on a running job is refused; a lost results.csv row and an edited counts.csv are
    rewritten from state.json without sampling; a copied run folder's checkpoint is not counted again."""
    import shutil

    from biasamp.identity import folder_lock

    args = [f"checkpoint={tiny_checkpoint}", "sampler.num_steps=3", "save_grid=false", "batch_size=8",
            "n_per_class=4"]
    assert run_count(args, tmp_path).returncode == 0
    job = _one_job(tmp_path)
    results_csv = job.parent / "results.csv"
    with folder_lock(job, "a test"):
        assert "is in use by process" in _error_line(run_count(args, tmp_path))

    state_bytes, state_mtime = (job / "state.json").read_bytes(), (job / "state.json").stat().st_mtime_ns
    counts = (job / "counts.csv").read_text()
    results_csv.write_text(results_csv.read_text().splitlines()[0] + "\n")  # the job's row lost
    (job / "counts.csv").write_text(counts.replace(",True,", ",True,9", 1))  # a cell edited by hand
    again = run_count(args, tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "rewriting its files and results.csv rows from state.json, nothing sampled" in again.stdout
    assert (job / "state.json").read_bytes() == state_bytes and (job / "state.json").stat().st_mtime_ns == state_mtime
    assert (job / "counts.csv").read_text() == counts and len(pd.read_csv(results_csv)) == 1

    def no_nan(value):
        raise AssertionError(f"meta.json holds {value}")

    meta = json.loads((job / "meta.json").read_text(), parse_constant=no_nan)
    assert meta["images_this_session"] == 0 and meta["nfe_per_image"] == 5

    copied = tmp_path / "copied_run"
    shutil.copytree(tiny_checkpoint.parent.parent, copied)
    proc = run_count([f"checkpoint={copied}", *args[1:]], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "continuing from the counts of the same job" in proc.stdout and "nothing sampled" in proc.stdout
    (other,) = [p for p in _job_dirs(tmp_path) if p != job]
    assert other.name == job.name and other.parent.name == f"copied_run-{tiny_checkpoint.stem}"
    assert (other / "counts.csv").read_text() == counts
