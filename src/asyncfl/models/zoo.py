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
        side = int(round((in_features / channels) ** 0.5))
        if side * side * channels != in_features:
            raise ValueError(f"cnn needs square images: {in_features} features, {channels} channels")
        self.channels, self.side = channels, side
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        pooled = side // 2
        self.fc = nn.Linear(2 * width * pooled * pooled, num_classes)

    def forward(self, x):
        x = x.reshape(-1, self.channels, self.side, self.side)
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": SmallCNN,
}


def build_model(name: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](in_features, num_classes, **kwargs)
