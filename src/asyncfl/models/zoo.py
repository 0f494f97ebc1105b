"""Small models for the bundled tasks. Inputs arrive flat; models reshape what they need."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class LogisticRegression(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,)):
        super().__init__()
        dims = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a linear head, sized for 8x8 to 28x28 single-channel images."""

    def __init__(self, in_features: int, num_classes: int, channels: int = 1, width: int = 16):
        super().__init__()
        self.channels, self.side = channels, _square_side(in_features, channels, "cnn")
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        pooled = self.side // 2
        self.fc = nn.Linear(2 * width * pooled * pooled, num_classes)

    def forward(self, x):
        x = x.reshape(-1, self.channels, self.side, self.side)
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _square_side(in_features: int, channels: int, name: str) -> int:
    side = int(round((in_features / channels) ** 0.5))
    if side * side * channels != in_features:
        raise ValueError(f"{name} needs square images: {in_features} features, {channels} channels")
    return side


class FemnistCNN(nn.Module):
    """LEAF's FEMNIST model: 5x5 convolutions of 32 and 64 channels, each followed by 2x2 max
    pooling, a 2048-unit dense layer and the 62-way output."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.side = _square_side(in_features, 1, "femnist_cnn")
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * (self.side // 4) ** 2, 2048)
        self.fc2 = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = x.reshape(-1, 1, self.side, self.side)
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CifarCNN(nn.Module):
    """The CIFAR-10 network of FedAsync's experiments (the classic TensorFlow tutorial shape, without
    its local response normalisation): 5x5 convolutions of 64 and 64 channels with 3x3 stride-2
    max pooling, dense layers of 384 and 192 units."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.side = _square_side(in_features, 3, "cifar_cnn")
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        pooled = ((self.side + 1) // 2 + 1) // 2
        self.fc1 = nn.Linear(64 * pooled * pooled, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x):
        x = x.reshape(-1, 3, self.side, self.side)
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 3, 2, padding=1)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 3, 2, padding=1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


class CharGRU(nn.Module):
    """Next-character model for Shakespeare: an embedding and a GRU written from basic ops (the
    fused nn.GRU cannot be vmapped over per-client weights), predicting from the last state."""

    def __init__(self, in_features: int, num_classes: int, vocab: int | None = None, embed: int = 8,
                 hidden: int = 128):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab or num_classes, embed)
        self.inp = nn.Linear(embed, 3 * hidden)  # input contributions to reset, update, new gates
        self.rec = nn.Linear(hidden, 3 * hidden)  # recurrent contributions
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        gates_x = self.inp(self.embed(x.long()))  # [B, T, 3H], all steps at once
        return self.head(self._recur(gates_x, lambda h: self.rec(h)))

    def _recur(self, gates_x: torch.Tensor, rec) -> torch.Tensor:
        """The GRU over time; gates_x is [..., T, 3H], rec maps a state [..., H] to [..., 3H]."""
        h = gates_x.new_zeros(*gates_x.shape[:-2], self.hidden)
        for t in range(gates_x.shape[-2]):
            rx, zx, nx = gates_x[..., t, :].chunk(3, -1)
            rh, zh, nh = rec(h).chunk(3, -1)
            r, z = torch.sigmoid(rx + rh), torch.sigmoid(zx + zh)
            h = (1 - z) * torch.tanh(nx + r * nh) + z * h
        return h

    def stacked_forward(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The same model for J clients at once, each with its own parameters p[name][j]: batched
        matmuls instead of vmap, whose per-op cost dominates over 80 time steps."""
        j, b, t = x.shape
        vocab = p["embed.weight"].shape[1]
        rows = x.long() + (torch.arange(j) * vocab).view(j, 1, 1)
        e = p["embed.weight"].reshape(j * vocab, -1)[rows]  # [J, B, T, E]
        gates_x = torch.baddbmm(p["inp.bias"].unsqueeze(1), e.reshape(j, b * t, -1),
                                p["inp.weight"].transpose(1, 2)).view(j, b, t, -1)
        w_rec, b_rec = p["rec.weight"].transpose(1, 2), p["rec.bias"].unsqueeze(1)
        h = self._recur(gates_x, lambda h: torch.baddbmm(b_rec, h, w_rec))
        return torch.baddbmm(p["head.bias"].unsqueeze(1), h, p["head.weight"].transpose(1, 2))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": SmallCNN,
    "femnist_cnn": FemnistCNN,
    "cifar_cnn": CifarCNN,
    "char_gru": CharGRU,
}


def build_model(name: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](in_features, num_classes, **kwargs)
