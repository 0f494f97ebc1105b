"""The one local trainer every algorithm and both runtimes share (SPEC §2).

Minibatch SGD with an optional proximal term (FedProx mu / FedAsync rho), run on the flat
parameter vector. The minibatch order is a pure function of (n_examples, steps, seed)
(`shuffle.minibatches`), so a deferred or batched execution of the same client gives the same
result.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from asyncfl.algorithms.shuffle import minibatches, mix
from asyncfl.algorithms.types import ClientUpdate
from asyncfl.models.flat import FlatModel


class LocalTrainer:
    """Plain or proximal SGD; with `meta` set, Per-FedAvg's MAML-style step instead.

    Per-FedAvg (Fallah et al. 2020) trains for a model that does well after one more local step
    of size `meta_lr`: each step takes an inner step on one minibatch, evaluates the gradient
    at the result on a second, and steps the model with it ("fo", first order) or with it
    corrected by the Hessian-vector product on a third minibatch ("hf", Hessian-free: the
    product is a central difference of two gradients, step `meta_delta`).
    """

    BATCHES_PER_STEP = {None: 1, "fo": 2, "hf": 3}
    GRADIENTS_PER_STEP = {None: 1, "fo": 2, "hf": 4}

    def __init__(
        self,
        model: FlatModel,
        lr: float,
        batch_size: int,
        local_steps: int | None = None,
        local_epochs: float | None = None,
        prox_mu: float = 0.0,
        meta: str | None = None,
        meta_lr: float = 0.01,
        meta_delta: float = 1e-3,
    ):
        if (local_steps is None) == (local_epochs is None):
            raise ValueError("give exactly one of local_steps and local_epochs")
        if meta not in self.BATCHES_PER_STEP:
            raise ValueError(f"meta must be None, 'fo' or 'hf', got {meta!r}")
        self.model = model
        self.lr = lr
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.local_epochs = local_epochs
        self.prox_mu = prox_mu
        self.meta = meta
        self.meta_lr = meta_lr
        self.meta_delta = meta_delta

    @property
    def batches_per_step(self) -> int:
        return self.BATCHES_PER_STEP[self.meta]

    def num_steps(self, n_examples: int) -> int:
        if self.local_steps is not None:
            return self.local_steps
        return max(1, math.ceil(self.local_epochs * n_examples / (self.batch_size * self.batches_per_step)))

    def examples_per_step(self, n_examples: int) -> int:
        """Per-example gradient evaluations in one step: what a device's compute time scales with."""
        return min(self.batch_size, n_examples) * self.GRADIENTS_PER_STEP[self.meta]

    def batch_indices(self, n_examples: int, batches: int, seed: int) -> np.ndarray:
        """[batches, b] local example indices: consecutive epochs of fresh permutations."""
        b = min(self.batch_size, n_examples)
        return minibatches([n_examples], [batches], [b], mix(seed))[:, 0, :b]

    def _grad(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        wg = w.detach().requires_grad_(True)
        loss = self.model.loss(wg, x, y)
        (g,) = torch.autograd.grad(loss, wg)
        return g, float(loss.detach())

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
        planned = self.num_steps(n)
        steps = planned if steps is None else steps
        k = self.batches_per_step
        idx = torch.from_numpy(self.batch_indices(n, steps * k, seed))
        w = w0.clone()
        losses, start_loss = 0.0, math.nan
        for h in range(steps):
            batch = [idx[h * k + i] for i in range(k)]
            g, loss = self._grad(w, x[batch[0]], y[batch[0]])
            if h == 0:
                start_loss = loss
            if self.meta:
                g, loss = self._grad(w - self.meta_lr * g, x[batch[1]], y[batch[1]])
                if self.meta == "hf":
                    d = self.meta_delta
                    g_plus, _ = self._grad(w + d * g, x[batch[2]], y[batch[2]])
                    g_minus, _ = self._grad(w - d * g, x[batch[2]], y[batch[2]])
                    g = g - self.meta_lr * (g_plus - g_minus) / (2 * d)
            if self.prox_mu:
                g = g + self.prox_mu * (w - w0)
            w = w - self.lr * g
            losses += loss
        return ClientUpdate(
            client_id=client_id,
            base_version=base_version,
            delta=(w0 - w).detach(),
            n_examples=n,
            steps=steps,
            loss=losses / max(steps, 1),
            start_loss=start_loss,
            planned_steps=planned,
        )
