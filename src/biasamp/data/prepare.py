"""Fetch and unpack a dataset into the data folder: ``python -m biasamp.data.prepare <name> [--data-dir DIR]``.

* mnist (also named biased_mnist, multicolor_mnist): the IDX files via torchvision into ``<data_dir>/MNIST/raw/``.
* waterbirds: the group-DRO release tarball from Stanford, unpacked to
  ``<data_dir>/waterbird_complete95_forest2water2/``; checked by opening the archive and by checking that
  metadata.csv has its columns and that every file it lists exists (no checksum is pinned: none is
  published with the release).
* bffhq: hosted on Google Drive, which cannot be fetched reliably: prints where to get it and the layout.

Data already in place is checked and left alone. On any failure (offline, bad archive) the command
prints the exact layout expected and exits 1. The dataset loaders never download on their own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tarfile
import urllib.request
from pathlib import Path

WATERBIRDS_URL = "https://nlp.stanford.edu/data/dro/waterbird_complete95_forest2water2.tar.gz"
WATERBIRDS_FOLDER = "waterbird_complete95_forest2water2"
BFFHQ_SOURCE = (
    "the BFFHQ release of Lee et al. 2021 (Learning Debiased Representation via Disentangled Feature "
    "Augmentation), linked (Google Drive) from the README of github.com/kakaoenterprise/Learning-Debiased-Disentangled"
)
TIMEOUT_S = 30

LAYOUTS = {
    "mnist": """{d}/MNIST/raw/train-images-idx3-ubyte[.gz]
{d}/MNIST/raw/train-labels-idx1-ubyte[.gz]
{d}/MNIST/raw/t10k-images-idx3-ubyte[.gz]
{d}/MNIST/raw/t10k-labels-idx1-ubyte[.gz]""",
    "waterbirds": """{d}/waterbird_complete95_forest2water2/metadata.csv
    (columns img_filename, y, split, place, place_filename)
{d}/waterbird_complete95_forest2water2/<img_filename>
    (the JPEGs listed in metadata.csv, e.g. 001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg)
Download {url} and unpack it in {d} (tar -xzf waterbird_complete95_forest2water2.tar.gz -C {d}).""",
    "bffhq": """{d}/bffhq/0.5pct/align/<0|1>/<id>_<y>_<z>.png      (y == z)
{d}/bffhq/0.5pct/conflict/<0|1>/<id>_<y>_<z>.png   (y != z)
{d}/bffhq/valid/<id>_<y>_<z>.png
{d}/bffhq/test/<id>_<y>_<z>.png
(y = age 0 young / 1 old, z = gender 0 female / 1 male). Get the bffhq folder from {src}.""",
}


def download(url: str, dest: Path, timeout: float = TIMEOUT_S) -> None:
    """Stream ``url`` to ``dest`` (via ``dest.part``, renamed when complete)."""
    part = dest.with_name(dest.name + ".part")
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as out:
        shutil.copyfileobj(response, out, length=1 << 20)
    part.replace(dest)


def layout_message(name: str, data_dir: Path) -> str:
    return f"Expected layout for {name}:\n" + LAYOUTS[name].format(d=data_dir, url=WATERBIRDS_URL, src=BFFHQ_SOURCE)


def check_waterbirds(data_dir: Path) -> str | None:
    """None when the unpacked Waterbirds folder is complete, else what is wrong."""
    import pandas as pd

    from biasamp.data.waterbirds import REQUIRED_COLUMNS

    metadata = data_dir / WATERBIRDS_FOLDER / "metadata.csv"
    if not metadata.is_file():
        return f"missing {metadata}"
    table = pd.read_csv(metadata, dtype=str)
    missing = [c for c in (*REQUIRED_COLUMNS, "place_filename") if c not in table.columns]
    if missing:
        return f"{metadata} lacks column(s) {', '.join(missing)}"
    absent = [f for f in table["img_filename"] if not (metadata.parent / f).is_file()]
    if absent:
        return f"{len(absent)} of the {len(table)} images listed in {metadata} are missing, e.g. {absent[0]}"
    return None


def prepare_mnist(data_dir: Path) -> None:
    from torchvision.datasets import MNIST

    for train in (True, False):
        MNIST(root=str(data_dir), train=train, download=True)


def prepare_waterbirds(data_dir: Path) -> None:
    if check_waterbirds(data_dir) is None:
        print(f"waterbirds: already in place under {data_dir / WATERBIRDS_FOLDER}")
        return
    archive = data_dir / (WATERBIRDS_FOLDER + ".tar.gz")
    if not archive.is_file():
        print(f"waterbirds: downloading {WATERBIRDS_URL} to {archive} ...", flush=True)
        download(WATERBIRDS_URL, archive)
    with tarfile.open(archive, "r:*") as tar:
        names = tar.getnames()
        if f"{WATERBIRDS_FOLDER}/metadata.csv" not in names:
            raise RuntimeError(f"{archive} does not contain {WATERBIRDS_FOLDER}/metadata.csv")
        if hasattr(tarfile, "data_filter"):  # refuses absolute paths, links out of data_dir, devices
            tar.extractall(data_dir, filter="data")
        else:  # pragma: no cover - Pythons before 3.11.4 lack extraction filters
            tar.extractall(data_dir)
    problem = check_waterbirds(data_dir)
    if problem:
        raise RuntimeError(f"unpacked {archive} but the data is incomplete: {problem}")
    print(f"waterbirds: ready under {data_dir / WATERBIRDS_FOLDER} (you may delete {archive})")


def prepare_bffhq(data_dir: Path) -> None:
    root = data_dir / "bffhq"
    missing = [str(root / s) for s in ("0.5pct", "valid", "test") if not (root / s).is_dir()]
    if missing:
        raise RuntimeError(f"BFFHQ cannot be downloaded automatically (Google Drive); missing {', '.join(missing)}")
    print(f"bffhq: already in place under {root}")


PREPARERS = {"mnist": prepare_mnist, "waterbirds": prepare_waterbirds, "bffhq": prepare_bffhq}
# dataset names that are built from MNIST
PREPARERS.update({"biased_mnist": prepare_mnist, "multicolor_mnist": prepare_mnist})
LAYOUTS.update({"biased_mnist": LAYOUTS["mnist"], "multicolor_mnist": LAYOUTS["mnist"]})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m biasamp.data.prepare", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=sorted(PREPARERS))
    parser.add_argument("--data-dir", default=os.environ.get("BIASAMP_DATA_DIR", "data"),
                        help="root data folder (default: $BIASAMP_DATA_DIR or ./data)")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir)
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        PREPARERS[args.name](data_dir)
    except Exception as err:  # noqa: BLE001 - offline, bad archive, ...: explain the manual route
        print(f"biasamp.data.prepare: {args.name}: could not prepare the data: {type(err).__name__}: {err}",
              file=sys.stderr)
        print(layout_message(args.name, data_dir), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
