"""Does counting in bf16 give the same rho_model as fp32? The agreement check the paper recipes wait for.

Counts one checkpoint twice under the same settings and sample indices, once with ``precision=fp32`` and once with
``precision=bf16`` (one count multirun, so the two differ in nothing else), then pairs the jobs and checks that
each precision's rho_model lies inside the other's Clopper-Pearson interval. Guidance multiplies the network's
bf16 error by up to 1 + 2w, so check at the largest w a recipe uses.

    python benchmarks/precision_check.py --checkpoint runs/train/paper_bmnist_rho0.9_seed0 --guidance 0,10 \
        --steps 18 --n-per-class 1000 --accelerator gpu
    python benchmarks/precision_check.py --checkpoint runs/train/quickstart_rho0.9_seed0 --guidance 0,3 \
        --steps 18 --n-per-class 200 --accelerator cpu          # the CPU check (bf16 autocast on the CPU)

Prints a table and writes JSON (device, torch version, date, every pair) to ``--out``; exits 0 when every pair
agrees, 1 when one does not, 2 on bad input (from the count app).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

# results.csv columns that are estimates or bookkeeping; every other column is a setting the pair shares
NOT_SETTINGS = ("job_dir", "precision", "n", "n_aligned", "rho_model", "ci_low", "ci_high", "ci_method", "ci_level",
                "delta", "n_invalid", "rho_model_valid", "nfe", "images_per_s", "class_fidelity", "class_fidelity_low",
                "class_fidelity_high", "class_fidelity_n", "class_fidelity_k")
SHOWN = ("attribute", "guidance", "sampler.name", "sampler.solver", "sampler.num_steps", "sampler.s_churn")


def count_both(checkpoint: str, guidance: str, steps: str, n_per_class: int, accelerator: str, out_dir: Path,
               extra: list[str]) -> pd.DataFrame:
    """results.csv of one count multirun over precision=fp32,bf16 (and the given guidance and steps)."""
    cmd = [sys.executable, "-m", "biasamp.count", "-m", f"checkpoint={checkpoint}", "sweep_name=precision-check",
           "precision=fp32,bf16", f"guidance={guidance}", f"sampler.num_steps={steps}", f"n_per_class={n_per_class}",
           f"fabric.accelerator={accelerator}", "save_grid=false", "progress=false", f"paths.output_dir={out_dir}",
           *extra]
    proc = subprocess.run(cmd, text=True)
    if proc.returncode != 0:
        sys.exit(proc.returncode)
    return pd.read_csv(out_dir / "count" / "precision-check" / "results.csv", keep_default_na=False, na_values=[""])


def pair_up(results: pd.DataFrame) -> list[dict]:
    """One record per setting: fp32's and bf16's rho_model and intervals, and whether they agree (each estimate
    inside the other's interval)."""
    keys = [k for k in results.columns if k not in NOT_SETTINGS]
    pairs = []
    for values, group in results.groupby(keys, dropna=False, sort=True):
        if sorted(group["precision"].astype(str)) != ["bf16", "fp32"]:
            raise SystemExit(f"precision_check: the setting {dict(zip(keys, values, strict=True))} has the jobs "
                             f"{sorted(group['precision'].astype(str))}, not one fp32 and one bf16; use a fresh "
                             "--work-dir")
        by = {str(p): row for p, row in zip(group["precision"], group.to_dict("records"), strict=True)}
        a, b = by["fp32"], by["bf16"]
        agree = bool(b["ci_low"] <= a["rho_model"] <= b["ci_high"] and a["ci_low"] <= b["rho_model"] <= a["ci_high"])
        setting = dict(zip(keys, values if isinstance(values, tuple) else (values,), strict=True))
        pairs.append({**{k: setting[k] for k in SHOWN if k in setting},
                      "n": int(a["n"]), "fp32": [a["rho_model"], a["ci_low"], a["ci_high"]],
                      "bf16": [b["rho_model"], b["ci_low"], b["ci_high"]],
                      "difference": b["rho_model"] - a["rho_model"], "agree": agree})
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint file or run folder")
    parser.add_argument("--guidance", default="0,3", help="comma-separated guidance scales (include the largest)")
    parser.add_argument("--steps", default="18", help="comma-separated step counts")
    parser.add_argument("--n-per-class", type=int, default=500)
    parser.add_argument("--accelerator", default="auto", choices=("auto", "cpu", "gpu"))
    parser.add_argument("--work-dir", default=None, help="where the count jobs go (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/precision-<stamp>.json)")
    parser.add_argument("extra", nargs="*", help="more count overrides, e.g. sampler=dpmpp")
    args = parser.parse_args()
    own = ("precision", "sweep_name", "paths.output_dir")
    fixed = [e for e in args.extra if e.split("=", 1)[0].lstrip("+~") in own]
    if fixed:
        parser.error(f"{fixed[0]}: the check sets precision, sweep_name and paths.output_dir itself")

    import torch

    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        results = count_both(args.checkpoint, args.guidance, args.steps, args.n_per_class, args.accelerator, work,
                             args.extra)
    pairs = pair_up(results)
    cuda = torch.cuda.is_available() and args.accelerator != "cpu"
    report = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
              "checkpoint": str(args.checkpoint), "n_per_class": args.n_per_class, "extra": args.extra,
              "pairs": pairs, "all_agree": all(p["agree"] for p in pairs)}
    out = Path(args.out or f"benchmarks/results/precision-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("| setting | n | fp32 ρ_model [95% CI] | bf16 ρ_model [95% CI] | bf16 − fp32 | agree |")
    print("|:---|---:|---:|---:|---:|:---|")
    for p in pairs:
        setting = ", ".join(f"{k.removeprefix('sampler.')}={p[k]}" for k in SHOWN if k in p)
        fmt = "{:.3f} [{:.3f}, {:.3f}]"
        print(f"| {setting} | {p['n']} | {fmt.format(*p['fp32'])} | {fmt.format(*p['bf16'])} | "
              f"{p['difference']:+.3f} | {'yes' if p['agree'] else 'NO'} |")
    print(f"{report['device']}, torch {report['torch']}: {sum(p['agree'] for p in pairs)}/{len(pairs)} settings agree "
          f"-> {out}")
    return 0 if report["all_agree"] and pairs else 1


if __name__ == "__main__":
    sys.exit(main())
