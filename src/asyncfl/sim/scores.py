"""Evaluation metrics beyond test accuracy and loss (`eval.metrics`): the built-in perplexity
(exp of the mean cross-entropy) and user functions "package.module:function" called as
f(logits [N, classes], y [N]) on the global test set, returning a float (a column named after
the function) or a {column: float} dict."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from asyncfl.config.base import ConfigError
from asyncfl.models.flat import FlatModel
from asyncfl.plugins import import_object

BUILT_IN = ("perplexity",)


class Scores:
    """Adds the configured metrics to an evaluation row."""

    def __init__(self, names: list[str], model: FlatModel):
        self.perplexity = "perplexity" in names
        self.functions: list[tuple[str, Callable]] = [
            (n, import_object(n, "eval.metrics")) for n in names if n not in BUILT_IN
        ]
        self.model = model

    def add(self, row: dict, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.perplexity:
            row["perplexity"] = math.exp(min(row["test_loss"], 700.0))  # exp overflows a float past ~709
        if not self.functions:
            return
        with torch.no_grad(), self.model.evaluating():
            logits = torch.cat([self.model.forward(w, x[s : s + 8192]) for s in range(0, len(y), 8192)])
        for name, f in self.functions:
            value = f(logits, y)
            if isinstance(value, dict):
                row.update({k: float(v) for k, v in value.items()})
            elif isinstance(value, (int, float)) or (isinstance(value, torch.Tensor) and value.numel() == 1):
                row[name.rpartition(":")[2].rpartition(".")[2]] = float(value)
            else:
                raise ConfigError(f"eval.metrics: {name} returned {type(value).__name__}; expected a float or a dict")
