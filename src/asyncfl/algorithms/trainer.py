"""The one local trainer every algorithm and both runtimes share (SPEC §2).

Minibatch SGD with an optional proximal term (FedProx mu / FedAsync rho), run on the flat
parameter vector. The minibatch order is a pure function of (n_examples, steps, seed), so a
deferred or batched execution of the same client gives the same result.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from asyncfl.algorithms.update import ClientUpdate
from asyncfl.models.flat import FlatModel


class LocalTrainer:
    def __init__(
        self,
        model: FlatModel,
        lr: float,
        batch_size: int,
        local_steps: int | None = None,
        local_epochs: float | None = None,
        prox_mu: float = 0.0,
    ):
        if (local_steps is None) == (local_epochs is None):
            raise ValueError("give exactly one of local_steps and local_epochs")
        self.model = model
        self.lr = lr
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.local_epochs = local_epochs
        self.prox_mu = prox_mu

    def num_steps(self, n_examples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * n_examples / self.batch_size))

    def examples_per_step(self, n_examples: int) -> int:
        return min(self.batch_size, n_examples)

    def batch_indices(self, n_examples: int, steps: int, seed: int) -> np.ndarray:
        """[steps, b] local example indices: consecutive epochs of fresh permutations."""
        b = self.examples_per_step(n_examples)
        rng = np.random.default_rng(seed)
        epochs = math.ceil(steps * b / n_examples)
        order = np.concatenate([rng.permutation(n_examples) for _ in range(epochs)])
        return order[: steps * b].reshape(steps, b)

    def train(
        self,
        w0: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        seed: int,
        client_id: int = -1,
        base_version: int = 0,
        steps: int | None = None,
    ) -> ClientUpdate:
        n = len(y)
        steps = self.num_steps(n) if steps is None else steps
        idx = torch.from_numpy(self.batch_indices(n, steps, seed))
        w = w0.clone()
        losses = 0.0
        for h in range(steps):
            wg = w.detach().requires_grad_(True)
            loss = self.model.loss(wg, x[idx[h]], y[idx[h]])
            (g,) = torch.autograd.grad(loss, wg)
            if self.prox_mu:
                g = g + self.prox_mu * (w - w0)
            w = w - self.lr * g
            losses += float(loss.detach())
        return ClientUpdate(
            client_id=client_id,
            base_version=base_version,
            delta=(w0 - w).detach(),
            n_examples=n,
            steps=steps,
            loss=losses / max(steps, 1),
        )
