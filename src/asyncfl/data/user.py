"""A user's own data as a `FederatedDataset`: arrays with a client id per example, a torch
`Dataset` split by a partitioner, or one dataset per client.

Examples are stored flat ([N, features]) like every bundled dataset, so the executors stay
shape-agnostic; `example_shape` remembers the original shape and a user's module receives its
examples in it (`asyncfl.models.custom.ExampleShape`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from asyncfl.data.federated import FederatedDataset
from asyncfl.data.partition import partition as split_by


def _tensor(value) -> torch.Tensor:
    """`value` as a tensor, sharing its memory where torch can: a read-only array (what PIL
    images and Hugging Face datasets give) is copied, since torch cannot share one safely."""
    if isinstance(value, torch.Tensor):
        return value
    array = np.asarray(value)
    return torch.as_tensor(array if array.flags.writeable else array.copy())


def as_tensors(source, what: str = "data", keys: tuple[str, str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of arrays or tensors, or from a map-style dataset whose items are
    (x, y) pairs, or dicts read at `keys` (x key, y key: a Hugging Face dataset's columns).
    8-bit images (uint8, e.g. PIL images) become float32 in [0, 1], other floats float32,
    other integers int64 (token ids); labels int64."""
    if isinstance(source, tuple) and len(source) == 2:
        x, y = (_tensor(v) for v in source)
    elif hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        items = [source[i] for i in range(len(source))]
        if keys is not None:
            if not items or not all(isinstance(it, dict) and set(keys) <= set(it) for it in items):
                raise ValueError(f"{what}: items must be dicts with keys {list(keys)}")
            items = [(it[keys[0]], it[keys[1]]) for it in items]
        if not items or not all(isinstance(it, (tuple, list)) and len(it) == 2 for it in items):
            raise ValueError(f"{what}: a dataset's items must be (x, y) pairs (or dicts: give keys=(x, y))")
        x = torch.stack([_tensor(it[0]) for it in items])
        y = torch.as_tensor(np.asarray([int(it[1]) for it in items]))
    else:
        raise ValueError(f"{what}: expected (x, y) arrays or a torch Dataset, got {type(source).__name__}")
    if len(x) != len(y) or len(y) == 0:
        raise ValueError(f"{what}: x and y must hold the same number (> 0) of examples, got {len(x)} and {len(y)}")
    if y.dim() != 1 or y.dtype.is_floating_point:
        raise ValueError(f"{what}: y must be integer class labels [n], got {y.dtype} {list(y.shape)}")
    if x.dtype == torch.uint8:
        x = x.to(torch.float32) / 255.0
    x = x.to(torch.float32) if x.dtype.is_floating_point else x.to(torch.int64)
    return x, y.to(torch.int64)


@dataclass
class FederatedData(FederatedDataset):
    """A `FederatedDataset` built from user data; see the constructors."""

    example_shape: tuple[int, ...] | None = None  # one example's shape, when not [features]
    source: str = "custom"  # what summaries call the dataset
    partition_kind: str = "natural"  # how clients were formed, for summaries

    @classmethod
    def _build(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        clients: list[np.ndarray],
        test,
        num_classes: int | None,
        names: list[str] | None,
        kind: str,
        keys: tuple[str, str] | None = None,
    ) -> FederatedData:
        x_test, y_test = as_tensors(test, "test", keys if not isinstance(test, tuple) else None)
        if tuple(x_test.shape[1:]) != tuple(x.shape[1:]):
            raise ValueError(f"test examples have shape {list(x_test.shape[1:])}, training ones {list(x.shape[1:])}")
        classes = int(max(y.max(), y_test.max())) + 1
        if num_classes is not None and num_classes < classes:
            raise ValueError(f"num_classes={num_classes}, but labels go up to {classes - 1}")
        shape = tuple(x.shape[1:]) if x.dim() > 2 else None
        return cls(
            x.reshape(len(x), -1),
            y,
            clients,
            x_test.reshape(len(x_test), -1),
            y_test,
            num_classes or classes,
            client_names=names,
            example_shape=shape,
            partition_kind=kind,
        )

    @classmethod
    def from_arrays(cls, x, y, client_ids, test, num_classes: int | None = None) -> FederatedData:
        """Examples x [N, ...], labels y [N] and each example's client (any ids: users, devices);
        clients are the distinct ids in sorted order. `test`: (x_test, y_test), the server's test set."""
        x, y = as_tensors((x, y))
        ids = np.asarray(client_ids)
        if len(ids) != len(y):
            raise ValueError(f"client_ids has {len(ids)} entries for {len(y)} examples")
        names, owner = np.unique(ids, return_inverse=True)
        order = np.argsort(owner, kind="stable")
        clients = np.split(order, np.cumsum(np.bincount(owner))[:-1])
        return cls._build(x, y, clients, test, num_classes, [str(n) for n in names], "natural")

    @classmethod
    def from_dataset(
        cls,
        dataset,
        num_clients: int,
        test,
        partition: str | Sequence[Sequence[int]] = "iid",
        seed: int = 0,
        num_classes: int | None = None,
        alpha: float = 0.5,
        classes_per_client: int = 2,
        exponent: float = 1.0,
        keys: tuple[str, str] | None = None,
    ) -> FederatedData:
        """A torch Dataset (or (x, y) arrays) split over `num_clients`: `partition` names a
        partitioner ("iid", "dirichlet" with `alpha`, "shards" with `classes_per_client`,
        "quantity_skew" with `exponent`), or gives each client's example indices itself
        (e.g. from another library's partitioner). `keys`: the x and y keys of dict items."""
        x, y = as_tensors(dataset, "dataset", keys)
        if isinstance(partition, str):
            clients = split_by(
                partition,
                y.numpy(),
                num_clients,
                seed,
                alpha=alpha,
                classes_per_client=classes_per_client,
                exponent=exponent,
            )
            kind = partition
        else:
            clients = [np.sort(np.asarray(p, dtype=np.int64)) for p in partition]
            if len(clients) != num_clients or any(len(p) == 0 for p in clients):
                raise ValueError(f"partition: expected {num_clients} non-empty index lists, got {len(clients)}")
            if any(p.min() < 0 or p.max() >= len(y) for p in clients):
                raise ValueError(f"partition: indices must lie in [0, {len(y)})")
            kind = "given"
        return cls._build(x, y, clients, test, num_classes, None, kind, keys)

    @classmethod
    def from_clients(
        cls, clients: Sequence, test, num_classes: int | None = None, keys: tuple[str, str] | None = None
    ) -> FederatedData:
        """One dataset per client: (x, y) pairs or torch Datasets (dict items read at `keys`,
        e.g. the partitions a Flower Datasets partitioner gives)."""
        parts = [as_tensors(c, f"client {k}", keys) for k, c in enumerate(clients)]
        if not parts:
            raise ValueError("from_clients: no clients")
        shapes = {tuple(x.shape[1:]) for x, _ in parts}
        if len(shapes) > 1:
            raise ValueError(f"clients' examples differ in shape: {sorted(shapes)}")
        sizes = np.array([len(y) for _, y in parts])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        indices = [np.arange(s, s + n) for s, n in zip(starts, sizes)]
        x = torch.cat([p[0] for p in parts])
        y = torch.cat([p[1] for p in parts])
        return cls._build(x, y, indices, test, num_classes, None, "natural", keys)
