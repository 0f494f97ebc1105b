"""Architectures a user might bring, for the differential tests and bench/custom_models.py:
each with the data it trains on (digits features, or token sequences)."""

from __future__ import annotations

import numpy as np
import torch
from conftest import digits_clients
from torch import nn

from asyncfl.data.federated import FederatedDataset

VOCAB, LENGTH = 24, 12


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 32), nn.Linear(32, 10)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


class PoolCnn(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6 * 4 * 4, 10)

    def forward(self, x):
        x = nn.functional.avg_pool2d(torch.relu(self.conv(x.view(-1, 1, 8, 8))), 2)
        return self.fc(x.flatten(1))


class Recurrent(nn.Module):
    """Embedding, PyTorch's fused GRU or LSTM, a head on the last output."""

    def __init__(self, cell: type[nn.RNNBase], layers: int = 1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.rnn = cell(8, 16, num_layers=layers, batch_first=True)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, x):
        out, _ = self.rnn(self.embed(x))
        return self.head(out[:, -1])


class EmbedBag(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.fc = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, x):
        return self.fc(self.embed(x).mean(1))


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(64, 32), nn.BatchNorm1d(32, track_running_stats=False), nn.Linear(32, 10)

    def forward(self, x):
        return self.b(torch.relu(self.norm(self.a(x))))


class WithDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(64, 32), nn.Dropout(0.3), nn.Linear(32, 10)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x))))


def token_clients(num_clients: int = 40, seed: int = 0) -> FederatedDataset:
    """Sequences of LENGTH tokens whose label is the token after a client-specific shift of the
    last one, clients of 4 to 60 examples."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(4, 60, num_clients)
    x = torch.from_numpy(rng.integers(0, VOCAB, (int(sizes.sum()) + 200, LENGTH)))
    shift = np.repeat(rng.integers(1, 3, num_clients), sizes)
    y = (x[:, -1] + torch.from_numpy(np.concatenate([shift, np.ones(200, dtype=np.int64)]))) % VOCAB
    ends = np.cumsum(sizes)
    clients = [np.arange(e - n, e) for e, n in zip(ends, sizes)]
    return FederatedDataset(x[: ends[-1]], y[: ends[-1]], clients, x[ends[-1] :], y[ends[-1] :], VOCAB)


# name -> (module factory, data factory, batched by the generic path?)
CASES = {
    "mlp": (Mlp, lambda: digits_clients(40), True),
    "cnn_pool": (PoolCnn, lambda: digits_clients(40), True),
    "gru": (lambda: Recurrent(nn.GRU), token_clients, True),
    "lstm_2_layers": (lambda: Recurrent(nn.LSTM, layers=2), token_clients, True),
    "embedding_linear": (EmbedBag, token_clients, True),
    "batchnorm": (WithBatchNorm, lambda: digits_clients(40), False),
    "dropout": (WithDropout, lambda: digits_clients(40), False),
}
