"""Tests for the real-data loaders (Waterbirds, BFFHQ), the rho resampling rule, image decoding and the
prepare command, on fixture trees written here in the exact on-disk layouts (no network)."""

from __future__ import annotations

import io
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from biasamp.data import build_dataset
from biasamp.data import prepare as prepare_mod
from biasamp.data.bffhq import BFFHQ
from biasamp.data.images import decode_image, load_images
from biasamp.data.resample import rho_resample
from biasamp.data.waterbirds import Waterbirds
from biasamp.errors import UsageError
from tests.conftest import run_train

WB = "waterbird_complete95_forest2water2"
# (class y, bias) -> solid colour of its images; far apart so JPEG loss cannot confuse them
COLOURS = {(0, 0): (200, 30, 30), (0, 1): (30, 200, 30), (1, 0): (30, 30, 200), (1, 1): (200, 200, 30)}
# Waterbirds fixture: rows per (y, place); split of row i within a group is i % 3
WB_GROUPS = {(0, 0): 30, (0, 1): 6, (1, 0): 5, (1, 1): 25}
# BFFHQ fixture: files per folder and (y, z)
BF_TRAIN = {(0, 0): 20, (1, 1): 18, (0, 1): 4, (1, 0): 3}
BF_VALID = {(0, 0): 3, (1, 1): 3, (0, 1): 1, (1, 0): 1}
BF_TEST = {(0, 0): 3, (1, 1): 3, (0, 1): 2, (1, 0): 2}


def solid(colour, size=(24, 18)) -> Image.Image:
    return Image.new("RGB", size, colour)


def framed(colour, width=30, height=20) -> Image.Image:
    """The group colour in the central square, white bands left and right that a centre crop removes."""
    image = Image.new("RGB", (width, height), (255, 255, 255))
    left = (width - height) // 2
    image.paste(Image.new("RGB", (height, height), colour), (left, 0))
    return image


def jpeg_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_waterbirds(root: Path) -> dict:
    """The real layout: <root>/waterbird_complete95_forest2water2/metadata.csv (shuffled columns, an extra
    one) plus JPEGs in species folders; two extra rows whose files are corrupt (truncated, not an image)."""
    folder = root / WB
    rows = []
    for (y, place), count in WB_GROUPS.items():
        species = folder / f"{y:03d}.Species_{y}_{place}"
        species.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"{species.name}/bird_{y}_{place}_{i:03d}.jpg"
            (folder / name).write_bytes(jpeg_bytes(solid(COLOURS[(y, place)])))
            rows.append({"img_id": len(rows) + 1, "img_filename": name, "y": y, "split": i % 3, "place": place,
                         "place_filename": f"/x/y/{i}.jpg"})
    bad = folder / "999.Broken"
    bad.mkdir()
    whole = jpeg_bytes(solid((1, 2, 3), size=(64, 64)))
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (bad / "garbage.jpg").write_bytes(b"this is not an image at all")
    for name in ("truncated.jpg", "garbage.jpg"):
        rows.append({"img_id": len(rows) + 1, "img_filename": f"999.Broken/{name}", "y": 0, "split": 0, "place": 0,
                     "place_filename": "/x/bad.jpg"})
    table = pd.DataFrame(rows)[["place", "img_filename", "split", "img_id", "place_filename", "y"]]
    table.to_csv(folder / "metadata.csv", index=False)
    return {"table": table, "bad": ["999.Broken/truncated.jpg", "999.Broken/garbage.jpg"]}


def make_bffhq(root: Path) -> list[str]:
    """The real layout under <root>/bffhq/ (PNGs, framed so the centre crop matters), one badly named file
    in valid/ and one truncated PNG in test/. Returns the names of the bad files."""
    base = root / "bffhq"
    n = 0
    for (y, z), count in BF_TRAIN.items():
        folder = base / "0.5pct" / ("align" if y == z else "conflict") / str(y)
        folder.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            framed(COLOURS[(y, z)]).save(folder / f"{n:05d}_{y}_{z}.png")
            n += 1
    for sub, groups in (("valid", BF_VALID), ("test", BF_TEST)):
        (base / sub).mkdir(parents=True)
        for (y, z), count in groups.items():
            for _ in range(count):
                framed(COLOURS[(y, z)]).save(base / sub / f"{n:05d}_{y}_{z}.png")
                n += 1
    framed((0, 0, 0)).save(base / "valid" / "no_labels_here.png")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    (base / "test" / "99999_0_0.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (base / "test" / "notes.txt").write_text("ignored: not an image file")
    return ["no_labels_here.png", "99999_0_0.png"]


@pytest.fixture(scope="module")
def wb_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wb")
    make_waterbirds(root)
    return root


@pytest.fixture(scope="module")
def bf_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bf")
    make_bffhq(root)
    return root


def group_counts(ds) -> dict[tuple[int, int], int]:
    return dict(Counter(zip(ds.labels.tolist(), ds.biases.tolist(), strict=True)))


def check_colours(ds, tol: int) -> None:
    """Every stored image has its group's colour everywhere (labels and images stayed paired)."""
    for i in range(len(ds)):
        image, y, b = ds[i]
        expected = torch.tensor(COLOURS[(y, b)], dtype=torch.float32)[:, None, None] / 127.5 - 1.0
        assert (image - expected).abs().max() <= tol / 127.5, (i, y, b)


# ---------------------------------------------------------------- the resampling rule


@pytest.mark.parametrize(
    ("rho", "aligned", "conflicting"),
    [  # pooled Waterbirds fixture after dropping the 2 corrupt files: class 0 has 30 aligned + 6 conflicting,
        # class 1 has 25 + 5 (n = 36, 30). Hand calculation of the rule:
        (0.9, 25, 2),   # targets a: 32, 27 / c: 4, 3 -> a=25, c=3; 25/28 <= 0.9 -> conflicting floor(25*.1/.9)=2
        (0.5, 5, 5),    # targets a: 18, 15 / c: 18, 15 -> a=15, c=5; 15/20 > 0.5 -> aligned floor(5*.5/.5)=5
        (0.8, 20, 5),   # targets a: 28, 24 / c: 8, 6 -> a=24, c=5; 24/29 > 0.8 -> aligned floor(5*.8/.2)=20
        (0.95, 25, 1),  # targets a: 34, 28 / c: 2, 2 -> a=25, c=2; 25/27 <= .95 -> floor(25*.05/.95)=1
        (1.0, 25, 0),   # targets c: 0 -> c=0; keep a=25, conflicting 0
        (0.0, 0, 5),    # targets a: 0 -> aligned 0, c=min(6, 5)=5
    ],
)
def test_waterbirds_counts_follow_the_rule(wb_root, rho, aligned, conflicting):
    ds = Waterbirds(wb_root, rho=rho, img_resolution=8)
    expected = {k: v for k, v in {(0, 0): aligned, (1, 1): aligned, (0, 1): conflicting,
                                  (1, 0): conflicting}.items() if v}
    assert group_counts(ds) == expected
    assert ds.n_aligned == 2 * aligned and ds.n_conflicting == 2 * conflicting
    assert ds.rho_effective == pytest.approx(aligned / (aligned + conflicting))
    assert ds.rho_per_class == pytest.approx([aligned / (aligned + conflicting)] * 2)
    assert ds.class_counts == [aligned + conflicting] * 2


@pytest.mark.parametrize(("rho", "aligned", "conflicting"), [
    # pooled BFFHQ fixture (bad name and truncated file dropped): class 0 (young) 26 aligned (female) +
    # 7 conflicting, class 1 (old) 24 aligned (male) + 6 conflicting (n = 33, 30)
    (0.9, 24, 2),  # targets a: 29, 27 / c: 4, 3 -> a=24, c=3; 24/27 <= .9 -> floor(24*.1/.9)=2
    (0.5, 6, 6),   # targets a: 16, 15 / c: 17, 15 -> a=15, c=6; 15/21 > .5 -> floor(6*.5/.5)=6
])
def test_bffhq_counts_follow_the_rule(bf_root, rho, aligned, conflicting):
    ds = BFFHQ(bf_root, rho=rho, img_resolution=8)
    assert group_counts(ds) == {(0, 0): aligned, (1, 1): aligned, (0, 1): conflicting, (1, 0): conflicting}
    assert ds.class_names == ["young", "old"] and ds.bias_names == ["female", "male"]


def test_rho_resample_float_artefacts_and_grouping():
    # 100 per class, 60 aligned / 40 conflicting: rho=0.29 targets floor(100*0.29) = 29 aligned (not 28)
    labels = np.repeat([0, 1], 100)
    biases = np.concatenate([np.repeat([0, 1], [60, 40]), np.repeat([1, 0], [60, 40])])
    idx = rho_resample(labels, biases, 0.29, seed=3)
    # a = min(60, 29) = 29, c = min(40, 71) = 40; 29/69 > .29 -> aligned floor(40*.29/.71) = 16
    sel_l, sel_b = labels[idx], biases[idx]
    assert Counter(zip(sel_l.tolist(), sel_b.tolist(), strict=True)) == {(0, 0): 16, (0, 1): 40, (1, 1): 16,
                                                                         (1, 0): 40}
    assert len(set(idx.tolist())) == len(idx)  # without replacement
    assert sel_l.tolist() == [0] * 56 + [1] * 56 and (sel_b[:16] == 0).all()  # grouped by class, aligned first
    assert np.array_equal(idx, rho_resample(labels, biases, 0.29, seed=3))
    assert not np.array_equal(idx, rho_resample(labels, biases, 0.29, seed=4))
    # 29 aligned + 71 conflicting per class: target floor(100 * 0.29) = 29 (int() would give 28), a=29, c=71,
    # 29/100 <= 0.29 -> keep a, conflicting floor(29 * .71 / .29) = 71 (the float quotient is 70.99999...)
    biases = np.concatenate([np.repeat([0, 1], [29, 71]), np.repeat([1, 0], [29, 71])])
    idx = rho_resample(labels, biases, 0.29, seed=0)
    assert sorted(idx.tolist()) == list(range(200))


def test_unreachable_rho_names_key_value_and_range(wb_root):
    # 0.99: a=25, c=1 -> conflicting floor(25*.01/.99) = 0, so the requested share cannot be reached
    with pytest.raises(UsageError, match=r"dataset\.rho=0\.99.*Achievable: rho in about \[0\.1667, 0\.9615\]"):
        Waterbirds(wb_root, rho=0.99, img_resolution=8)
    labels = np.array([0, 0, 1, 1])
    with pytest.raises(UsageError, match=r"dataset\.rho=1\.0 cannot be reached"):
        rho_resample(labels, np.array([1, 1, 1, 1]), 1.0, seed=0)  # class 0 has no aligned sample
    with pytest.raises(UsageError, match=r"dataset\.rho=1\.5"):
        Waterbirds(wb_root, rho=1.5)


# ---------------------------------------------------------------- Waterbirds


def test_waterbirds_images_splits_and_dropped(wb_root, capsys):
    ds = Waterbirds(wb_root, rho=None, img_resolution=16)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dropped 2 file(s)" in err[0] and "truncated.jpg" in err[0]
    assert len(ds) == sum(WB_GROUPS.values())
    assert group_counts(ds) == WB_GROUPS
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(ds), 3, 16, 16)
    assert ds.images.is_contiguous()
    assert ds.in_channels == 3 and ds.img_resolution == 16 and ds.num_classes == 2 and ds.num_biases == 2
    assert ds.labels.dtype == torch.int64 and ds.biases.dtype == torch.int64
    assert ds.class_names == ["landbird", "waterbird"] and ds.bias_names == ["land", "water"]
    image, _, _ = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 16, 16)
    assert image.min() >= -1.0 and image.max() <= 1.0
    check_colours(ds, tol=12)
    summary = ds.summary()
    assert summary["n_dropped"] == 2 and ds.n_dropped == 2
    assert [Path(f.split(" ")[0]).name for f in summary["dropped_files"]] == ["truncated.jpg", "garbage.jpg"]
    assert summary["n"] == len(ds) and summary["rho_requested"] is None
    assert summary["rho_effective"] == pytest.approx(55 / 66)
    for split, code in (("train", 0), ("val", 1), ("test", 2)):
        part = Waterbirds(wb_root, rho=None, split=split, img_resolution=8)
        expected = {g: len([i for i in range(n) if i % 3 == code]) for g, n in WB_GROUPS.items()}
        assert group_counts(part) == expected, split
        assert part.n_dropped == (2 if split == "train" else 0)  # the broken rows are in split 0


def test_waterbirds_on_error_raise_names_first_bad_file(wb_root):
    with pytest.raises(UsageError, match=r"truncated\.jpg"):
        Waterbirds(wb_root, rho=None, img_resolution=8, on_error="raise")
    Waterbirds(wb_root, rho=None, split="val", img_resolution=8, on_error="raise")  # no bad file there
    with pytest.raises(UsageError, match=r"dataset\.on_error='ignore'"):
        Waterbirds(wb_root, rho=None, on_error="ignore")
    with pytest.raises(UsageError, match=r"dataset\.split='validation'"):
        Waterbirds(wb_root, rho=None, split="validation")


def test_waterbirds_deterministic_by_seed(wb_root):
    a = Waterbirds(wb_root, rho=0.5, img_resolution=8, seed=1)
    b = Waterbirds(wb_root, rho=0.5, img_resolution=8, seed=1)
    c = Waterbirds(wb_root, rho=0.5, img_resolution=8, seed=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and torch.equal(a.biases, b.biases)
    assert a.files == b.files and len(a.files) == len(a)
    assert group_counts(a) == group_counts(c)
    assert a.files != c.files  # 5 of 25..30 aligned files per class drawn: another seed draws others
    assert set(a.files) <= {str(p) for p in (wb_root / WB).rglob("*.jpg")}
    check_colours(a, tol=12)


def test_waterbirds_metadata_errors(tmp_path):
    with pytest.raises(UsageError) as err:
        Waterbirds(tmp_path, rho=0.9)
    assert str(tmp_path / WB / "metadata.csv") in str(err.value)
    assert "python -m biasamp.data.prepare waterbirds" in str(err.value)
    folder = tmp_path / WB
    folder.mkdir()
    (folder / "metadata.csv").write_text("img_filename,split,extra\na.jpg,0,1\n")
    with pytest.raises(UsageError, match=r"missing column\(s\) y, place"):
        Waterbirds(tmp_path, rho=0.9)
    (folder / "metadata.csv").write_text("place,img_filename,y,split\n0,a.jpg,2,0\n1,b.jpg,x,0\n0,c.jpg,1,0\n")
    with pytest.raises(UsageError, match=r"column 'y' has value\(s\) \['2', 'x'\] outside \[0, 1\]"):
        Waterbirds(tmp_path, rho=0.9)
    (folder / "metadata.csv").write_text("place,img_filename,y,split\n0,a.jpg,1,3\n")
    with pytest.raises(UsageError, match=r"column 'split' has value\(s\) \['3'\]"):
        Waterbirds(tmp_path, rho=0.9)


def test_waterbirds_unreadable_metadata_is_a_usage_error(tmp_path):
    folder = tmp_path / WB
    folder.mkdir()
    (folder / "metadata.csv").write_bytes(b"")
    with pytest.raises(UsageError, match=r"metadata\.csv: not a readable CSV file") as err:
        Waterbirds(tmp_path, rho=0.9)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("builder", ["waterbirds", "bffhq"])
def test_rho_null_keeps_the_split_through_the_registry(builder, wb_root, bf_root):
    root = wb_root if builder == "waterbirds" else bf_root
    ds = build_dataset({"name": builder, "data_dir": str(root), "rho": None, "img_resolution": 8})
    expected = WB_GROUPS if builder == "waterbirds" else {g: BF_TRAIN[g] + BF_VALID[g] + BF_TEST[g]
                                                          for g in BF_TRAIN}
    assert group_counts(ds) == expected and ds.summary()["rho_requested"] is None


# ---------------------------------------------------------------- BFFHQ


def test_bffhq_layout_splits_crop_and_dropped(bf_root, capsys):
    ds = BFFHQ(bf_root, rho=None, img_resolution=12)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dropped 2 file(s)" in err[0]
    pooled = {g: BF_TRAIN[g] + BF_VALID[g] + BF_TEST[g] for g in BF_TRAIN}
    assert group_counts(ds) == pooled
    assert ds.images.shape == (len(ds), 3, 12, 12) and ds.images.dtype == torch.uint8
    check_colours(ds, tol=1)  # PNG, and the white side bands were cropped away
    assert ds.n_dropped == 2
    names = sorted(Path(f.split(" ")[0]).name for f in ds.summary()["dropped_files"])
    assert names == ["99999_0_0.png", "no_labels_here.png"]
    reasons = dict((Path(p).name, r) for p, r in ds.dropped)
    assert "does not parse" in reasons["no_labels_here.png"] and "unreadable" in reasons["99999_0_0.png"]
    assert group_counts(BFFHQ(bf_root, rho=None, split="train", img_resolution=8)) == BF_TRAIN
    assert group_counts(BFFHQ(bf_root, rho=None, split="valid", img_resolution=8)) == BF_VALID
    assert group_counts(BFFHQ(bf_root, rho=None, split="test", img_resolution=8)) == BF_TEST
    with pytest.raises(UsageError, match=r"no_labels_here\.png: name does not parse"):
        BFFHQ(bf_root, rho=None, split="valid", on_error="raise")
    with pytest.raises(UsageError, match=r"99999_0_0\.png: unreadable"):
        BFFHQ(bf_root, rho=None, split="test", on_error="raise")


def test_bffhq_folder_must_match_name(tmp_path):
    make_bffhq(tmp_path)
    framed(COLOURS[(1, 1)]).save(tmp_path / "bffhq" / "0.5pct" / "align" / "0" / "77777_1_1.png")
    framed(COLOURS[(0, 1)]).save(tmp_path / "bffhq" / "0.5pct" / "align" / "0" / "77778_0_1.png")
    ds = BFFHQ(tmp_path, rho=None, split="train", img_resolution=8)
    assert group_counts(ds) == BF_TRAIN
    reasons = dict((Path(p).name, r) for p, r in ds.dropped)
    assert "class folder '0'" in reasons["77777_1_1.png"] and "align/" in reasons["77778_0_1.png"]


def test_bffhq_missing_folder_names_path(tmp_path):
    with pytest.raises(UsageError) as err:
        BFFHQ(tmp_path, rho=0.9)
    assert str(tmp_path / "bffhq" / "0.5pct") in str(err.value)
    assert "python -m biasamp.data.prepare bffhq" in str(err.value)
    (tmp_path / "bffhq" / "0.5pct").mkdir(parents=True)
    with pytest.raises(UsageError, match=str(tmp_path / "bffhq" / "valid")):
        BFFHQ(tmp_path, rho=0.9)


def test_bffhq_deterministic_by_seed(bf_root):
    a, b = BFFHQ(bf_root, rho=0.5, img_resolution=8, seed=5), BFFHQ(bf_root, rho=0.5, img_resolution=8, seed=5)
    c = BFFHQ(bf_root, rho=0.5, img_resolution=8, seed=6)
    assert a.files == b.files and torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.files != c.files and group_counts(a) == group_counts(c)


# ---------------------------------------------------------------- decoding


def test_decode_centre_crops_and_resizes_antialiased(tmp_path):
    stripes = np.zeros((40, 60, 3), dtype=np.uint8)  # h=40, w=60: crop keeps columns 10..49
    stripes[:, 10:50:2] = 255
    stripes[:, :10] = (0, 255, 0)
    stripes[:, 50:] = (0, 255, 0)
    Image.fromarray(stripes).save(tmp_path / "s.png")
    out = decode_image(tmp_path / "s.png", 10)
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8
    # antialiased: each output pixel averages 4 columns, half of them white -> about 128, grey (no green band)
    assert (np.abs(out.astype(int) - 128) < 30).all()
    images, kept, dropped = load_images([tmp_path / "s.png", tmp_path / "absent.png"], 10, "skip")
    assert kept.tolist() == [True, False] and images.shape == (1, 3, 10, 10)
    assert dropped == [(str(tmp_path / "absent.png"), "missing file")]
    with pytest.raises(UsageError, match="absent.png"):
        load_images([tmp_path / "s.png", tmp_path / "absent.png"], 10, "raise")


# ---------------------------------------------------------------- registry, config, train CLI


@pytest.mark.parametrize("name", ["waterbirds", "bffhq"])
def test_registry_builds_from_config(name, wb_root, bf_root):
    """The dataset node of the train config, and of the paper preset, builds from the fixture."""
    from tests.conftest import compose_train

    root = wb_root if name == "waterbirds" else bf_root
    cfg = compose_train([f"dataset={name}", "rho=0.5", f"paths.data_dir={root}", "seed=1"]).dataset
    assert list(cfg) == ["name", "data_dir", "rho", "split", "img_resolution", "seed", "on_error"]
    assert cfg.split == "pooled" and cfg.img_resolution == 64 and cfg.on_error == "skip"
    ds = build_dataset(cfg)
    assert ds.name == name and ds.img_resolution == 64 and ds.seed == 1 and ds.rho_effective == 0.5
    bad = {**dict(cfg), "colour_jitter": 0.1}
    with pytest.raises(UsageError, match=r"dataset\.colour_jitter"):
        build_dataset(bad)


@pytest.mark.parametrize("name, label_dropout, lr, batch, kimg, halflife", [
    ("waterbirds", 0.15, 2e-4, 64, 15000, 200),
    ("bffhq", 0.3, 1e-6, 128, 90000, 500),  # the seed's fine-tuning lr, kept as published
])
def test_paper_presets_carry_the_seed_table(name, label_dropout, lr, batch, kimg, halflife):
    from tests.conftest import compose_train

    cfg = compose_train([f"experiment=paper_{name}", "rho=null"])
    assert cfg.dataset.name == name and cfg.dataset.rho is None and cfg.dataset.img_resolution == 64
    assert cfg.model.name == "ddpmpp_64" and cfg.model.img_resolution == 64
    net = cfg.model.net
    assert (net.model_channels, list(net.channel_mult), net.num_blocks, list(net.attn_resolutions)) == (
        128, [1, 2, 2, 2], 4, [16])
    assert (net.dropout, net.label_dropout) == (0.1, label_dropout)
    assert (cfg.optimizer.lr, cfg.batch_size, cfg.total_kimg, cfg.ema.halflife_kimg) == (lr, batch, kimg, halflife)
    assert cfg.lr_schedule._target_.endswith("CosineToZero") and cfg.trainer.accelerator == "gpu"


@pytest.mark.parametrize("name, rho", [("waterbirds", 0.95), ("bffhq", 0.8)])
def test_paper_preset_trains_on_the_fixture_on_cpu(name, rho, wb_root, bf_root, tmp_path):
    """experiment=paper_<name> as docs/datasets.md runs it, made small: the CPU trainer and the tiny model at its
    32 px, for three steps."""
    root = wb_root if name == "waterbirds" else bf_root
    proc = run_train([f"experiment=paper_{name}", f"rho={rho}", f"paths.data_dir={root}", "trainer=cpu", "model=tiny",
                      "dataset.img_resolution=32", "trainer.max_steps=3", "batch_size=8", "name=smoke"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped 2 file(s)" in proc.stderr
    assert list((tmp_path / "runs" / "train" / "smoke" / "checkpoints").glob("*.ckpt"))


# ---------------------------------------------------------------- prepare


def test_prepare_offline_prints_layout_and_exits_1(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(prepare_mod, "WATERBIRDS_URL", "http://127.0.0.1:9/waterbirds.tar.gz")
    assert prepare_mod.main(["waterbirds", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "could not prepare" in err
    assert f"{tmp_path}/{WB}/metadata.csv" in err and "img_filename, y, split, place, place_filename" in err
    assert not list(tmp_path.glob("*.tar.gz"))  # no half-written archive left under the final name
    assert prepare_mod.main(["bffhq", "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/bffhq/0.5pct/align/<0|1>/<id>_<y>_<z>.png" in err and "Google Drive" in err


def test_prepare_waterbirds_unpacks_and_checks(tmp_path, monkeypatch, capsys, wb_root):
    archive = tmp_path / "src.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(wb_root / WB, arcname=WB)
    calls = []

    def fake_download(url, dest, timeout=0):
        calls.append(url)
        dest.write_bytes(archive.read_bytes())

    monkeypatch.setattr(prepare_mod, "download", fake_download)
    data = tmp_path / "data"
    assert prepare_mod.main(["waterbirds", "--data-dir", str(data)]) == 0
    assert calls == [prepare_mod.WATERBIRDS_URL]
    assert (data / WB / "metadata.csv").is_file()
    assert len(Waterbirds(data, rho=None, img_resolution=8)) == sum(WB_GROUPS.values())
    assert prepare_mod.main(["waterbirds", "--data-dir", str(data)]) == 0  # already there: no download
    assert len(calls) == 1 and "already in place" in capsys.readouterr().out
    # an archive without metadata.csv is refused
    (data / WB / "metadata.csv").unlink()
    (data / (WB + ".tar.gz")).unlink()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(wb_root / WB / "999.Broken", arcname=f"{WB}/999.Broken")
    assert prepare_mod.main(["waterbirds", "--data-dir", str(data)]) == 1
    assert "does not contain" in capsys.readouterr().err
