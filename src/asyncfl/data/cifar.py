"""CIFAR-10, "python version": data_batch_1..5 and test_batch pickles from a local folder.

Each batch is a pickled dict with b"data" (uint8 [N, 3072], channel-major: 1024 red, 1024 green,
1024 blue values of a 32x32 image) and b"labels" (N ints in 0..9). `path` may be the folder
holding the batches or its parent containing `cifar-10-batches-py/`. Unpickling is restricted
to plain containers and numpy arrays, so a foreign pickle cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
FEATURES = 3 * 32 * 32
HINT = "download CIFAR-10 (python version) and set data.path to its cifar-10-batches-py folder"

_ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "list"),
    ("builtins", "dict"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        if module.startswith("numpy.core"):  # pickles from numpy 1.x; numpy 2 moved it to numpy._core
            try:
                return super().find_class("numpy._core" + module[len("numpy.core") :], name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def _folder(path: Path) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"CIFAR-10 folder not found: {path}; {HINT}")
    if not (path / TEST_BATCH).is_file() and (path / "cifar-10-batches-py").is_dir():
        return path / "cifar-10-batches-py"
    return path


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8 [N, 3072], labels int64 [N]) of one batch file, validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch not found: {path}; {HINT}")
    try:
        with path.open("rb") as f:
            blob = _SafeUnpickler(f, encoding="bytes").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
    ) as err:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch pickle ({type(err).__name__}: {err})") from None
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: expected a pickled dict, found {type(blob).__name__}")
    blob = {k.decode() if isinstance(k, bytes) else k: v for k, v in blob.items()}
    if "data" not in blob or "labels" not in blob:
        raise ValueError(f"{path}: missing b'data' or b'labels' (keys: {sorted(map(str, blob))})")
    data, labels = np.asarray(blob["data"]), np.asarray(blob["labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != FEATURES:
        raise ValueError(f"{path}: b'data' must be uint8 [N, {FEATURES}], found {data.dtype} {list(data.shape)}")
    if labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {labels.size} labels")
    if not np.issubdtype(labels.dtype, np.integer) or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise ValueError(f"{path}: labels must be integers in 0..9")
    return data, labels.astype(np.int64)


def load_cifar10(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(x_train [50000, 3072] float32 in [0, 1], y_train int64, x_test, y_test, 10), channel-major."""
    folder = _folder(Path(path))
    missing = [n for n in (*TRAIN_BATCHES, TEST_BATCH) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10: {', '.join(missing)} not found in {folder}; {HINT}")
    parts = [read_batch(folder / n) for n in TRAIN_BATCHES]
    x_te, y_te = read_batch(folder / TEST_BATCH)
    x_tr = np.concatenate([d for d, _ in parts])
    y_tr = np.concatenate([lab for _, lab in parts])

    def scale(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / np.float32(255.0))

    return scale(x_tr), torch.from_numpy(y_tr), scale(x_te), torch.from_numpy(y_te), 10


load = load_cifar10
