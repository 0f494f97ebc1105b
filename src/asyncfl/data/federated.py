"""Examples stored once, clients as index arrays into them (no per-client copies)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class FederatedDataset:
    x: torch.Tensor  # [N, features] float32, all training examples
    y: torch.Tensor  # [N] int64
    client_indices: list[np.ndarray]  # per client, indices into x / y
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

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
