"""The installed package runs every app: configs ship inside the wheel, found wherever biasamp is installed."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **env})


def test_wheel_installed_non_editable_runs_the_training_app_from_an_empty_folder(tmp_path):
    # 1. build the wheel offline, from a copy of the sources (the checkout stays untouched)
    source, dist = tmp_path / "source", tmp_path / "dist"
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    build = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", str(dist), str(source)], cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("biasamp-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "biasamp/conf/train.yaml" in names and "biasamp/conf/experiment/quickstart.yaml" in names
    assert "biasamp/conf/sampler/edm.yaml" in names and "biasamp/conf/count.yaml" in names

    # 2. a fresh virtualenv with only the wheel installed in it; its dependencies come from this test
    #    environment's site-packages, appended after its own (no network)
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp_path).returncode == 0
    python = venv / "bin" / "python"
    install = _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    str(wheel)], cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp_path).stdout.strip())
    ours = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "zz_test_dependencies.pth").write_text("\n".join(ours) + "\n")

    # 3. from an empty folder: the installed copy (not the checkout) is the one imported, and the app runs
    work = tmp_path / "empty"
    work.mkdir()
    where = _run([str(python), "-c", "import biasamp; print(biasamp.__file__)"], cwd=work)
    assert where.returncode == 0, where.stderr[-2000:]
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout
    proc = _run([str(python), "-m", "biasamp.train", "experiment=quickstart", "trainer.max_steps=2",
                 "trainer.enable_progress_bar=false"], cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = [p for p in (work / "runs" / "train").iterdir() if not p.is_symlink()]
    assert run.name.startswith("quickstart_rho0.9_seed0-") and list((run / "checkpoints").glob("ckpt-*.ckpt"))
    # a user's own config folder joins Hydra's search path
    own = tmp_path / "myconf" / "experiment"
    own.mkdir(parents=True)
    (own / "mine.yaml").write_text("# @package _global_\ndefaults:\n  - quickstart\nname: mine\n")
    composed = _run([str(python), "-m", "biasamp.train", "experiment=mine", f"hydra.searchpath=[file://{own.parent}]",
                     "--cfg", "job"], cwd=work)
    assert composed.returncode == 0, composed.stderr[-3000:]
    assert "name: mine" in composed.stdout
