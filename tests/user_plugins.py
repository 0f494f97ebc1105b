"""User code that configs name as plug-ins ("user_plugins:function"): model factories and data
loaders, good and bad."""

import numpy as np
import torch
from torch import nn

import asyncfl
from asyncfl.data import digits


class ImageCnn(nn.Module):
    def __init__(self, num_classes: int, width: int = 4):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, width, 3, padding=1), nn.Linear(width * 16, num_classes)

    def forward(self, x):
        assert x.shape[1:] == (1, 8, 8)
        return self.fc(nn.functional.max_pool2d(torch.relu(self.conv(x)), 2).flatten(1))


def image_cnn(num_classes: int, width: int = 4) -> nn.Module:
    return ImageCnn(num_classes, width)


def seven_way(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 7))


def not_a_model():
    return [1, 2]


def _images():
    x, y, x_test, y_test, _ = digits.load(0.2, 0)
    return x.view(-1, 1, 8, 8), y, x_test.view(-1, 1, 8, 8), y_test


def digit_images(clients: int = 20) -> asyncfl.FederatedData:
    x, y, x_test, y_test = _images()
    return asyncfl.FederatedData.from_arrays(x, y, np.arange(len(y)) % clients, test=(x_test, y_test))


def digit_arrays():
    """(train, test) without clients: the config's partitioner splits it."""
    x, y, x_test, y_test = _images()
    return (x, y), torch.utils.data.TensorDataset(x_test, y_test)


def device_images():
    x, y, _, _ = _images()
    return x[:40], y[:40]


def a_string():
    return "data"
