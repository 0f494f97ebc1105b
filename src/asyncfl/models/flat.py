"""A module evaluated at an arbitrary flat parameter vector.

Algorithms, aggregators and the wire format all work on one contiguous float32 vector;
this adapter is the single place that maps it to a torch module's named parameters.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call


class FlatModel:
    def __init__(self, module: nn.Module):
        if list(module.buffers()):
            raise ValueError(
                f"{type(module).__name__} has buffers (e.g. running statistics); "
                "a federated model must be fully described by its parameters"
            )
        self.module = module
        self.name = type(module).__name__  # what messages call the model
        self.names = [n for n, _ in module.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in module.named_parameters()]
        self.sizes = [math.prod(s) for s in self.shapes]
        self.numel = sum(self.sizes)
        # layers that draw random numbers while training: their draws are seeded per job
        self.random = any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in module.modules())

    def initial_weights(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.module.parameters()]).to(torch.float32)

    def unflatten(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, torch.split(w, self.sizes), self.shapes)}

    def forward(self, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, self.unflatten(w), (x,))

    def loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.forward(w, x), y)

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """The module in eval mode (dropout off) for the block, then back in its own mode."""
        mode = self.module.training
        self.module.train(False)
        try:
            yield
        finally:
            self.module.train(mode)

    @contextmanager
    def seeded(self, seed: int) -> Iterator[None]:
        """For a module with dropout layers, torch's global generator seeded by a job's seed for
        the block, then restored: a job draws the same masks whichever executor trains it, and
        when. Others skip it (about 0.1 ms a call)."""
        if not self.random:
            yield
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed % 2**63)
            yield

    @torch.no_grad()
    def evaluate(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor, chunk: int = 8192) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of the model at w over (x, y), in eval mode."""
        correct, loss = 0, 0.0
        with self.evaluating():
            for s in range(0, len(y), chunk):
                logits = self.forward(w, x[s : s + chunk])
                loss += float(nn.functional.cross_entropy(logits, y[s : s + chunk], reduction="sum"))
                correct += int((logits.argmax(1) == y[s : s + chunk]).sum())
        return correct / len(y), loss / len(y)
