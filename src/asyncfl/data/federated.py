"""Examples stored once, clients as index arrays into them (no per-client copies)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FederatedDataset:
    """A pool of stored examples, clients as index arrays into it, and a global test set.

    `x` is [N, features]: float32 features, or int64 token ids for text tasks (Shakespeare,
    Sent140). `client_indices[k]` selects client k's training examples in `x` / `y`. The
    optional `client_test_indices[k]` selects client k's held-out examples in the same pool
    (natural LEAF-style splits); such examples are never in any `client_indices`. `x_test` /
    `y_test` are the global test set the server evaluates on.
    """

    x: torch.Tensor  # [N, features] float32 (or int64 token ids), every stored example
    y: torch.Tensor  # [N] int64
    client_indices: list[np.ndarray]  # per client, indices of its training examples in x / y
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    client_test_indices: list[np.ndarray] | None = None  # per client, held-out examples in x / y
    client_names: list[str] | None = None  # per client, e.g. the LEAF user or 'play/ROLE'

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def client_sizes(self) -> np.ndarray:
        return np.array([len(i) for i in self.client_indices])

    def client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.from_numpy(self.client_indices[client])
        return self.x[idx], self.y[idx]

    def client_test_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client `client`'s held-out examples; needs `client_test_indices`."""
        if self.client_test_indices is None:
            raise ValueError("this dataset has no per-client test split (client_test_indices is None)")
        idx = torch.from_numpy(self.client_test_indices[client])
        return self.x[idx], self.y[idx]
