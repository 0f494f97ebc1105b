"""A user's own `torch.nn.Module` as the simulator's `FlatModel`, checked against the data.

The simulator stores examples flat ([N, features]); a module written for examples of another
shape (images [C, H, W]) gets them back in that shape through `ExampleShape`.
"""

from __future__ import annotations

import torch
from torch import nn

from asyncfl.config.base import ConfigError
from asyncfl.models.flat import FlatModel


class ExampleShape(nn.Module):
    """Reshapes flat examples [B, features] to [B, *shape] before the user's module."""

    def __init__(self, module: nn.Module, shape: tuple[int, ...]):
        super().__init__()
        self.module, self.shape = module, tuple(shape)

    def forward(self, x):
        return self.module(x.reshape(-1, *self.shape))


def user_flat_model(module: nn.Module, data, origin: str = "model") -> FlatModel:
    """`module` wrapped for `data` (a FederatedDataset, or what the network client knows of it:
    num_classes, x_test), with errors that say what does not fit; `origin` names the module's
    source in them (a factory path, or "model")."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"{origin}: expected a torch.nn.Module, got {type(module).__name__}")
    shape = getattr(data, "example_shape", None)
    wrapped = ExampleShape(module, shape) if shape else module
    try:
        model = FlatModel(wrapped)
    except ValueError as err:
        raise ConfigError(
            f"{origin}: {err}. Federated training averages parameters only: give BatchNorm "
            "track_running_stats=False (batch statistics), or use GroupNorm / LayerNorm"
        ) from None
    model.name = type(module).__name__  # not the ExampleShape around it
    if model.numel == 0:
        raise ConfigError(f"{origin}: {type(module).__name__} has no trainable parameters")
    sample = data.x_test[:2]
    seen = tuple(shape) if shape else tuple(sample.shape[1:])
    try:
        with torch.no_grad():
            out = model.forward(model.initial_weights(), sample)
    except Exception as err:  # the module's own error, e.g. a layer of the wrong width
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{origin}: {type(module).__name__} fails on the data's examples "
            f"(shape {list(seen)}, {sample.dtype}): {first}"
        ) from None
    want = (len(sample), int(data.num_classes))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"{origin}: {type(module).__name__} maps {len(sample)} examples of shape {list(seen)} to {got}; "
            f"expected {list(want)} (one logit per class, {data.num_classes} classes)"
        )
    return model
