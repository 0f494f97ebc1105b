"""IDX files (the MNIST / Fashion-MNIST container format) and the Fashion-MNIST loader.

An IDX file is: two zero bytes, a type code byte, a byte giving the number of dimensions d,
then d big-endian uint32 sizes, then the values in row-major order, big-endian. Files may be
gzip-compressed (detected from the content, not the name).

Fashion-MNIST comes from the Debian package `dataset-fashion-mnist`, which installs
/usr/share/datasets/fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "install Debian package dataset-fashion-mnist (make data) or set data.path"

# type code -> numpy dtype (big-endian where it matters)
_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# base names as published; the '.' variant appears on some mirrors
_FILES = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({err})") from None
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """The array stored in one IDX file (gzip or plain), in native byte order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: not an IDX file (only {len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} "
            f"(expected 0x0000TTDD with type TT in {sorted(f'{c:02x}' for c in _DTYPES)})"
        )
    dtype, ndim = _DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions, {len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise ValueError(f"{path}: truncated IDX data: dims {dims} need {expected} bytes, found {found}")
    if found > expected:
        raise ValueError(f"{path}: {found - expected} unexpected trailing bytes after IDX data of dims {dims}")
    arr = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _find(directory: Path, names: tuple[str, ...]) -> Path:
    for name in names:
        for candidate in (name + ".gz", name):
            if (directory / candidate).is_file():
                return directory / candidate
    raise FileNotFoundError(f"Fashion-MNIST: {names[0]}(.gz) not found in {directory}; {INSTALL_HINT}")


def _images_labels(directory: Path, images_key: str, labels_key: str) -> tuple[np.ndarray, np.ndarray]:
    ip, lp = _find(directory, _FILES[images_key]), _find(directory, _FILES[labels_key])
    images, labels = read_idx(ip), read_idx(lp)
    if images.ndim != 3:
        raise ValueError(f"{ip}: expected 3-D images [N, rows, cols], got dims {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{lp}: expected 1-D labels [N], got dims {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{ip} has {len(images)} images but {lp} has {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"{lp}: labels must lie in 0..9, found {labels.min()}..{labels.max()}")
    return images, labels


def load_fashion_mnist(
    path: str | Path | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(x_train [60000, 784] float32 in [0, 1], y_train int64, x_test, y_test, 10).

    `path` is the directory holding the four IDX files (default /usr/share/datasets/fashion-mnist).
    The split is the published one (60,000 train, 10,000 test).
    """
    directory = Path(path) if path is not None else DEFAULT_DIR
    if not directory.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST directory not found: {directory}; {INSTALL_HINT}")
    out = []
    for images_key, labels_key in (("train_images", "train_labels"), ("test_images", "test_labels")):
        images, labels = _images_labels(directory, images_key, labels_key)
        x = images.reshape(len(images), -1).astype(np.float32)
        if images.dtype == np.uint8:
            x /= 255.0
        out += [torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))]
    if out[0].shape[1] != out[2].shape[1]:
        raise ValueError(f"{directory}: train images have {out[0].shape[1]} pixels, test images {out[2].shape[1]}")
    return out[0], out[1], out[2], out[3], 10


load = load_fashion_mnist
