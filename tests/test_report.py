"""The report app: tables equal hand-computed numbers (intervals recomputed by the chosen method), figures
exist for the keys that vary and only for those, and bad input stops with one line and exit status 2.

Sweeps are built here in the count app's own file formats (written with its writers): two checkpoints
(rho_data 0.9 and 0.99), each swept over 2 step counts x 3 guidance scales, 50 samples per class, 2 classes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from scipy.stats import binomtest

from biasamp.analysis import plots, tables
from biasamp.counting.counts import counts_table, write_counts
from biasamp.counting.meta import JobMeta, oracle_entry, write_meta
from biasamp.counting.results import ResultsRow, update_results
from biasamp.counting.state import CountState
from tests.conftest import CONF_DIR

N_PER_CLASS = 50
CLASSES, COLOURS = ["0", "1"], ["red", "green"]
# (rho_data, steps, w) -> aligned samples of class 0 and class 1, invalid samples of class 0 and class 1
HAND = {
    (0.9, 6, 0): (44, 46, 1, 0), (0.9, 6, 1): (47, 48, 0, 0), (0.9, 6, 3): (30, 28, 5, 7),
    (0.9, 18, 0): (45, 45, 0, 0), (0.9, 18, 1): (48, 49, 0, 0), (0.9, 18, 3): (50, 49, 0, 0),
    (0.99, 6, 0): (49, 50, 0, 0), (0.99, 6, 1): (50, 50, 0, 0), (0.99, 6, 3): (40, 38, 2, 3),
    (0.99, 18, 0): (49, 49, 0, 0), (0.99, 18, 1): (50, 50, 0, 0), (0.99, 18, 3): (50, 50, 0, 0),
}
PNG, PDF = b"\x89PNG\r\n\x1a\n", b"%PDF"


def _run_name(rho: float, train_seed: int = 0) -> str:
    return f"biased_mnist_rho{rho}_seed{train_seed}-ckpt-0001000"


def write_sweep(root: Path, rho: float, confusion: dict | None = None, train_seed: int = 0,
                shift: tuple[int, int] = (0, 0), uncond: tuple[int, int] | None = None, mitigation: str = "",
                run: str | None = None) -> Path:
    """One count sweep folder (one checkpoint, 6 settings) exactly as biasamp.count writes it.

    ``train_seed``: the checkpoint's training seed (its run name says it); ``shift``: aligned samples of class
    0 and 1 moved to the other colour (another seed's model); ``uncond``: (red, green) counts of an uncond row;
    ``mitigation``: results.csv's mitigation column; ``run``: another run name."""
    run = run or _run_name(rho, train_seed)
    sweep = root / run
    for (r, steps, w), (a0, a1, inv0, inv1) in HAND.items():
        if r != rho:
            continue
        a0, a1 = a0 - shift[0], a1 - shift[1]
        job = sweep / f"{run}__edm-heun-steps{steps}-churn0-w{w}-{steps:02d}{w:02d}abc{train_seed}"
        state = CountState(identity={"test": steps}, shape=(2, 2))
        for c, (aligned, invalid) in enumerate(((a0, inv0), (a1, inv1))):
            counts = np.zeros((2, 2), dtype=np.int64)  # (colour, valid)
            other = 1 - c
            counts[c, 1] = aligned
            counts[other, 0] = invalid
            counts[other, 1] = N_PER_CLASS - aligned - invalid
            state.counts[CLASSES[c]], state.done[CLASSES[c]] = counts, N_PER_CLASS
        rows = list(CLASSES)
        if uncond is not None:
            state.counts["uncond"] = np.array([[0, uncond[0]], [0, uncond[1]]], dtype=np.int64)
            state.done["uncond"] = sum(uncond)
            rows.append("uncond")
        table = counts_table(state, rows, ["colour"], [COLOURS])
        write_counts(job, table)
        state.save(job)
        sampler = {"name": "edm", "solver": "heun", "num_steps": steps, "sigma_min": None, "sigma_max": None,
                   "rho": 7.0, "s_churn": 0.0, "s_min": 0.0, "s_max": float("inf"), "s_noise": 1.0,
                   "n_skipped_steps": 0}
        nfe = (2 * steps - 1) * (2 if w else 1)
        write_meta(job, JobMeta(
            run=run, rho_data=rho, class_names=CLASSES, rows=[{"name": r} for r in rows],
            dataset={"name": "biased_mnist", "rho": rho},
            dataset_summary={"class_names": CLASSES, "rho_per_class": [rho + 0.01, rho - 0.01]},
            sampler=sampler, guidance=float(w), guidance_uncond="null", seed=0, n_per_class=N_PER_CLASS,
            nfe_per_image=nfe, oracle=oracle_entry({"name": "colour"}, ["colour"], [COLOURS], confusion)))
        k, n = a0 + a1, 2 * N_PER_CLASS
        ci = binomtest(k, n).proportion_ci(0.95, method="exact")
        update_results(sweep / "results.csv", [ResultsRow(
            job_dir=job.name, run=run, checkpoint=f"/ckpts/{run}.ckpt", train_seed=train_seed,
            train_config=f"cfg{rho}", n_img=1000, dataset="biased_mnist", attribute="colour", rho_data=rho,
            sampler=sampler,
            guidance=float(w), guidance_uncond="null", guidance_interval="", oracle="colour",
            oracle_options='{"max_distance":80.0}', class_oracle="", precision="fp32", seed=0,
            n_per_class=N_PER_CLASS, n=n, n_aligned=k, rho_model=k / n, ci_low=ci.low, ci_high=ci.high,
            ci_method="clopper_pearson", ci_level=0.95, delta=k / n - rho, n_invalid=inv0 + inv1,
            rho_model_valid=k / (n - inv0 - inv1), nfe=float(nfe), images_per_s=100.0, mitigation=mitigation)])
    return sweep


@pytest.fixture
def sweeps(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "runs" / "count"
    return write_sweep(root, 0.9), write_sweep(root, 0.99)


def run_report(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "biasamp.report", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def compose_report(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("report", overrides=overrides)


def _ci(k: int, n: int, method: str = "exact", level: float = 0.95) -> tuple[float, float]:
    ci = binomtest(k, n).proportion_ci(level, method=method)
    return float(ci.low), float(ci.high)


# ---------------------------------------------------------------------------------------------- the app
def test_app_writes_hand_checked_tables_and_figures(sweeps, tmp_path):
    a, b = sweeps
    cwd = tmp_path / "cwd"
    proc = run_report([f"sweep=[{a},{b}]", "max_heatmaps=4"], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(cwd.iterdir()) == []  # no Hydra folders, logs or outputs in the working directory
    out = a / "report"

    # results.csv: numbers at full precision, interval recomputed (Clopper-Pearson by default)
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 12
    row = csv[(csv["rho_data"] == 0.9) & (csv["sampler.num_steps"] == 6) & (csv["guidance"] == 3)].iloc[0]
    low, high = _ci(58, 100)
    assert (row["n"], row["n_aligned"], row["n_invalid"]) == (100, 58, 12)
    assert row["rho_model"] == pytest.approx(0.58) and row["delta"] == pytest.approx(-0.32)
    assert (row["ci_low"], row["ci_high"]) == (pytest.approx(low, abs=1e-12), pytest.approx(high, abs=1e-12))
    assert row["invalid_frac"] == pytest.approx(0.12) and row["nfe"] == 22
    # the swept keys are columns, the run name (fixed by rho_data) and the constant keys are not
    assert {"sampler.num_steps", "guidance", "rho_data"} <= set(csv.columns)
    assert not {"run", "sampler.name", "sampler.solver", "sampler.s_churn", "seed"} & set(csv.columns)

    md = (out / "results.md").read_text()
    assert f"| 0.900 | 6 | 3 | 0.580 [{low:.3f}, {high:.3f}] | -0.320 | 100 | 12.0% | 22 |" in md
    assert "| ρ_data | steps | w | ρ_model [95% CI] | Δ | n | invalid | NFE |" in md
    assert "Clopper–Pearson" in md and "solver = heun" in md and "S_churn = 0" in md  # fixed keys in the caption
    tex = (out / "results.tex").read_text()
    assert "\\toprule" in tex and "\\midrule" in tex and "\\bottomrule" in tex
    assert f"0.900 & 6 & 3 & 0.580 [{low:.3f}, {high:.3f}] & $-0.320$ & 100 & 12.0\\% & 22 \\\\" in tex
    assert "biased\\_mnist" in tex  # LaTeX specials escaped

    per_class = pd.read_csv(out / "per_class.csv")
    pc = per_class[(per_class["rho_data"] == 0.9) & (per_class["sampler.num_steps"] == 6)
                   & (per_class["guidance"] == 3) & (per_class["class"] == 1)].iloc[0]
    assert (pc["n"], pc["n_aligned"]) == (50, 28) and pc["rho"] == pytest.approx(0.56)
    assert pc["class_rho_data"] == pytest.approx(0.89)  # the class's own share, from the dataset summary
    assert pc["ci_low"] == pytest.approx(_ci(28, 50)[0])

    # figures: rho_data, steps and guidance vary; churn does not
    for stem in ("rho_vs_rho_data", "rho_vs_steps", "rho_vs_guidance"):
        assert (out / f"{stem}.png").read_bytes()[:8] == PNG, stem
        assert (out / f"{stem}.pdf").read_bytes()[:4] == PDF, stem
    assert not list(out.glob("rho_vs_churn*"))
    heatmaps = sorted((out / "heatmaps").glob("*.png"))
    assert len(heatmaps) == 4 and all(p.stat().st_size > 1000 for p in heatmaps)
    assert len(list((out / "heatmaps").glob("*.pdf"))) == 4

    printed = proc.stdout.splitlines()
    assert f"table: {out / 'results.md'}" in printed and f"figure: {out / 'rho_vs_steps.png'}" in printed
    assert len([line for line in printed if line.startswith("figure: ")]) == 3 * 2 + 4 * 2
    manifest = json.loads((out / "report.json").read_text())
    assert "rho_vs_guidance.pdf" in manifest["files"] and manifest["settings"] == 12


def test_wilson_glob_out_dir_and_heatmap_limit(sweeps, tmp_path, capsys):
    from biasamp.report import run

    a, _ = sweeps
    out = tmp_path / "paper"
    cfg = compose_report([f"sweep={a.parent}/biased_mnist_rho*", f"out_dir={out}", "ci_method=wilson",
                          "ci_level=0.9", "formats=[png]", "tables=[csv,md]", "max_heatmaps=2"])
    written = run(cfg)
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == 12  # the glob found both sweeps
    row = csv[(csv["rho_data"] == 0.99) & (csv["sampler.num_steps"] == 6) & (csv["guidance"] == 3)].iloc[0]
    assert row["n_aligned"] == 78
    assert (row["ci_low"], row["ci_high"]) == tuple(pytest.approx(v, abs=1e-12) for v in _ci(78, 100, "wilson", 0.9))
    assert "90% Wilson" in (out / "results.md").read_text()
    assert not (out / "results.tex").exists() and not list(out.glob("*.pdf"))
    # heatmaps only for the 2 jobs furthest from rho_data: w = 3 at 6 steps, for both checkpoints
    names = sorted(p.name for p in (out / "heatmaps").glob("*.png"))
    assert len(names) == 2 and all("steps6" in n and "-w3-" in n for n in names)
    assert set(written["figures"]) >= {out / "rho_vs_steps.png", out / "rho_vs_guidance.png"}
    assert str(out / "results.csv") in capsys.readouterr().out


def test_constant_keys_produce_no_plot(sweeps, tmp_path):
    a, _ = sweeps
    df = tables.load_results(a)  # one checkpoint: rho_data does not vary
    out = tmp_path / "figures"
    kw = {"formats": ("png",), "width_in": 3.4, "dpi": 100}
    assert plots.plot_rho_vs_rho_data(df, out, **kw) == []
    assert plots.plot_rho_vs_churn(df, out, **kw) == []
    assert plots.plot_rho_vs_guidance(df[df["guidance"] == 1], out, **kw) == []
    assert plots.plot_rho_vs_steps(df, out, **kw) == [out / "rho_vs_steps.png"]
    assert sorted(p.name for p in out.iterdir()) == ["rho_vs_steps.png"]


def test_count_heatmap_with_unconditional_row(tmp_path):
    counts = pd.DataFrame({"class": ["0", "0", "1", "1", "uncond", "uncond"], "colour": ["red", "green"] * 3,
                           "valid": [True] * 6, "count": [9, 1, 2, 8, 6, 4]})
    paths = plots.plot_count_heatmap(counts, CLASSES, COLOURS, "colour", tmp_path / "hm", formats=("png", "pdf"))
    assert [p.name for p in paths] == ["hm.png", "hm.pdf"] and paths[0].read_bytes()[:8] == PNG
    assert plots.count_matrix(counts, [*CLASSES, "uncond"], COLOURS, "colour").tolist() == [[9, 1], [2, 8], [6, 4]]


def test_swept_keys_over_two_sampler_families():
    """edm and dpmpp rows: the solver and churn belong to edm alone, so only the sampler name, steps and w vary."""
    rows = []
    for name in ("edm", "dpmpp"):
        for steps in (6, 18):
            for w in (0.0, 1.0):
                rows.append({"rho_data": 0.9, "run": "r", "sampler.name": name, "sampler.num_steps": steps,
                             "sampler.solver": "heun" if name == "edm" else None,
                             "sampler.s_churn": 0.0 if name == "edm" else None,
                             "sampler.order": 2.0 if name == "dpmpp" else None, "guidance": w, "seed": 0})
    df = pd.DataFrame(rows)
    assert tables.swept_keys(df) == ["sampler.name", "sampler.num_steps", "guidance"]
    fixed = dict(tables.fixed_settings(df, ["sampler.name", "sampler.num_steps", "guidance"]))
    assert fixed["sampler.solver"] == "heun (edm)" and fixed["sampler.order"] == "2 (dpmpp)"
    assert fixed["seed"] == "0" and fixed["run"] == "r"


def test_corrected_rho_beside_raw_when_an_oracle_has_a_confusion(tmp_path):
    root = tmp_path / "runs" / "count"
    perfect = {"colour": {"labels": COLOURS, "counts": [[500, 0], [0, 500]]}}
    a, b = write_sweep(root, 0.9, confusion=perfect), write_sweep(root, 0.99)
    df = tables.load_results([a, b], n_boot=200)
    table = tables.results_table(df)
    with_conf = table[table["rho_data"] == 0.9]
    assert with_conf["rho_corrected"].to_numpy() == pytest.approx(with_conf["rho_model"].to_numpy())
    assert table.loc[table["rho_data"] == 0.99, "rho_corrected"].isna().all()
    md = tables.to_markdown(table)
    assert "ρ_corrected [95% CI]" in md and "| 0.580 [" in md and " – |" in md


def test_rerun_removes_stale_figures(sweeps, tmp_path, capsys):
    from biasamp.report import run

    a, b = sweeps
    out = tmp_path / "rep"
    common = [f"out_dir={out}", "formats=[png]", "tables=[md]", "max_heatmaps=0"]
    run(compose_report([f"sweep=[{a},{b}]", *common]))
    assert (out / "rho_vs_rho_data.png").is_file()
    run(compose_report([f"sweep={a}", *common]))  # one rho_data now: that figure is gone, not stale
    assert not (out / "rho_vs_rho_data.png").exists() and (out / "rho_vs_steps.png").is_file()


# ---------------------------------------------------------------------------------------------- bad input
def test_no_sweep_subprocess_exits_2_with_one_line(tmp_path):
    proc = run_report([], tmp_path / "cwd")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("biasamp.report: error: sweep is required"), lines
    assert list((tmp_path / "cwd").iterdir()) == []


@pytest.mark.parametrize("override, words", [
    ("sweep=MISSING", "does not exist"),
    ("sweep=EMPTY", "results.csv not found"),
    ("sweep='GLOB*'", "no folder matching"),
    ("ci_method=bogus", "ci_method='bogus'"),
    ("ci_level=1.5", "ci_level=1.5"),
    ("ci_level=0", "ci_level=0"),
    ("formats=[png,gif]", "formats="),
    ("max_heatmaps=-1", "max_heatmaps=-1"),
])
def test_bad_input_exits_2_with_one_line(sweeps, tmp_path, capsys, override, words):
    from biasamp.report import run

    (tmp_path / "empty").mkdir()
    override = (override.replace("MISSING", str(tmp_path / "nope")).replace("EMPTY", str(tmp_path / "empty"))
                .replace("GLOB", str(tmp_path / "zzz")))
    overrides = [override] if override.startswith("sweep=") else [f"sweep={sweeps[0]}", override]
    with pytest.raises(SystemExit) as exc:
        run(compose_report(overrides))
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("biasamp.report: error:") and words in lines[0], lines
    assert not (sweeps[0] / "report").exists()


def test_results_csv_without_count_columns_exits_2(tmp_path, capsys):
    from biasamp.report import run

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.csv").write_text("job_dir,n\nx,10\n")
    with pytest.raises(SystemExit) as exc:
        run(compose_report([f"sweep={sweep}"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lacks column(s)" in err[0] and "biasamp.count" in err[0]


def test_missing_job_folder_exits_2(sweeps, capsys):
    from biasamp.report import run

    a, _ = sweeps
    job = next(p for p in a.iterdir() if p.is_dir())
    (job / "counts.csv").unlink()
    with pytest.raises(SystemExit) as exc:
        run(compose_report([f"sweep={a}"]))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "counts.csv not found" in err[0]
    assert not (a / "report").exists()


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("biasamp.report: error: "), lines
    return lines[0]


def test_out_dir_that_is_a_file_exits_2(sweeps, tmp_path, capsys):
    from biasamp.report import run

    a, _ = sweeps
    (tmp_path / "taken").write_text("a file\n")
    for out_dir in (tmp_path / "taken", tmp_path / "taken" / "sub"):
        with pytest.raises(SystemExit) as exc:
            run(compose_report([f"sweep={a}", f"out_dir={out_dir}"]))
        assert exc.value.code == 2
        assert "is a file, not a folder" in _one_error_line(capsys)
    assert (tmp_path / "taken").read_text() == "a file\n"


def test_counts_csv_edited_by_hand_is_refused(sweeps, capsys):
    from biasamp.report import run

    a, _ = sweeps
    job = sorted(p for p in a.iterdir() if p.is_dir())[0]
    counts = job / "counts.csv"
    counts.write_text(counts.read_text().replace("\n0,red,True,", "\n0,red,True,1", 1))  # e.g. 44 -> 144
    with pytest.raises(SystemExit) as exc:
        run(compose_report([f"sweep={a}"]))
    assert exc.value.code == 2
    assert "does not hold the counts of state.json" in _one_error_line(capsys)
    assert not (a / "report").exists()


def test_malformed_meta_json_is_one_line(sweeps, capsys):
    from biasamp.report import run

    a, _ = sweeps
    job = sorted(p for p in a.iterdir() if p.is_dir())[0]
    (job / "meta.json").write_text('{"class_names": ["0", "1"], "oracle": {"attri')
    with pytest.raises(SystemExit) as exc:
        run(compose_report([f"sweep={a}"]))
    assert exc.value.code == 2 and "meta.json is not valid JSON" in _one_error_line(capsys)


def test_a_library_error_keeps_its_traceback(sweeps, monkeypatch):
    """Only a UsageError is bad input: a ValueError from the code (a bug) is raised, not shown as exit 2."""
    from biasamp.analysis import reporting
    from biasamp.report import run

    def broken(df):
        raise ValueError("a bug in the table code")

    monkeypatch.setattr(reporting, "results_table", broken)
    with pytest.raises(ValueError, match="a bug in the table code"):
        run(compose_report([f"sweep={sweeps[0]}"]))


def test_report_modules_do_not_import_torch():
    code = ("import sys, biasamp.analysis.tables, biasamp.analysis.reporting; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_results_table_carries_delta_interval_and_valid_share(sweeps):
    df = tables.load_results(sweeps[0])
    table = tables.results_table(df)
    row = table[(table["sampler.num_steps"] == 6) & (table["guidance"] == 3)].iloc[0]
    low, high = _ci(58, 100)
    assert (row["delta_low"], row["delta_high"]) == (pytest.approx(low - 0.9), pytest.approx(high - 0.9))
    assert row["rho_model_valid"] == pytest.approx(58 / 88)  # 12 invalid samples left out
    md = tables.to_markdown(table)
    assert "delta_low" not in md and "ρ_data: the mean over the counted classes" in md


def test_bias_table_beside_rho_when_a_job_counted_an_invdiff_model(tmp_path):
    root = tmp_path / "runs" / "count"
    base = write_sweep(root, 0.9)
    assert tables.bias_table(tables.load_results(base)).empty  # no InvDiff model: no Bias table
    mixed = write_sweep(root, 0.9, shift=(10, 4), mitigation="invdiff-grouper convex r=0.8 lam=1", run="inv")
    df = tables.load_results([base, mixed])
    assert set(df["mitigation"]) == {"none", "invdiff-grouper convex r=0.8 lam=1"}
    assert "mitigation" in tables.swept_keys(df)
    table = tables.bias_table(df)
    assert len(table) == 2 * 6 * 3  # 2 models x 6 settings x (2 classes + mean)
    pick = table[(table["sampler.num_steps"] == 6) & (table["guidance"] == 3)
                 & (table["mitigation"] != "none")].set_index("class")
    # class 0 of the mixed model: 30 - 10 = 20 red of 50 (5 invalid samples count as green): |20 - 30| / 50
    assert pick.loc["0", "bias"] == pytest.approx(0.2) and pick.loc["0", "rho"] == pytest.approx(0.4)
    lo, hi = _ci(20, 50)
    assert (pick.loc["0", "bias_low"], pick.loc["0", "bias_high"]) == (0.0, pytest.approx(max(1 - 2 * lo, 2 * hi - 1)))
    assert pick.loc["1", "bias"] == pytest.approx(abs(2 * 24 - 50) / 50)  # 28 - 4 = 24 green of 50
    assert pick.loc["mean", "bias"] == pytest.approx((0.2 + 0.04) / 2) and pick.loc["mean", "rho"] == 0.44
    assert pick.loc["mean", "ci_low"] == pytest.approx(_ci(44, 100)[0])
    # the mean's Bias bounds: the classes' bounds at level 1 - 0.05 / 2, averaged
    wide = [binomtest(k, 50).proportion_ci(0.975, method="exact") for k in (20, 24)]
    high = np.mean([max(abs(2 * c.low - 1), abs(2 * c.high - 1)) for c in wide])
    assert pick.loc["mean", "bias_high"] == pytest.approx(high) and pick.loc["mean", "bias_low"] == 0.0
    md = tables.to_markdown(table)
    assert "Bias [95% CI]" in md and "InvDiff's Bias per class" in md
    assert "$|c_i - c_j|" in tables.to_latex(table, "bias")


def test_bands_move_with_their_lines_and_stay_inside_the_axes(sweeps):
    df = tables.load_results(sweeps[0])
    fig = plots._line_figure(df, "guidance", ["sampler.num_steps"], xlabel="w", xscale="symlog",
                             reference="rho_data", ci_note="95% CI", width_in=3.4, title=None)
    ax = fig.axes[0]
    y_lo, y_hi = ax.get_ylim()
    assert y_lo <= df["ci_low"].min() and y_hi >= min(df["ci_high"].max(), 1.0)  # every band fits
    lines, bands = ax.get_lines()[:2], ax.collections[:2]
    for line, band in zip(lines, bands, strict=True):  # each band has its line's sideways shift
        assert band.get_transform() == line.get_transform()
    assert lines[0].get_transform() != lines[1].get_transform()
