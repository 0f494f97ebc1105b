"""The one local trainer every algorithm and both runtimes share.

Minibatch SGD with the algorithm's client-side terms (`ClientStep`), run for one client on its
flat parameter vector. The minibatch order is a pure function of (n_examples, steps, seed)
(`shuffle.minibatches`), so a deferred or batched execution of the same client gives the same
result.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from asyncfl.algorithms.client_step import ClientStep, Layers
from asyncfl.algorithms.shuffle import minibatches, mix
from asyncfl.algorithms.types import ClientUpdate
from asyncfl.models.flat import FlatModel

StartLoss = Literal["full", "first_batch", "none"]


class LocalTrainer:
    """Local SGD over a client's data; `step` holds the algorithm's step rule (proximal term,
    Per-FedAvg's meta step, see `ClientStep`).

    `start_loss` says what `ClientUpdate.start_loss` (the loss at the downloaded model, q-FedAvg's
    F_k) is: "full", the mean over all the client's examples (one extra forward pass over its
    data); "first_batch", the loss on the first minibatch, a by-product of the first step;
    "none", not computed (NaN).
    """

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
        start_loss: StartLoss = "first_batch",
    ):
        if (local_steps is None) == (local_epochs is None):
            raise ValueError("give exactly one of local_steps and local_epochs")
        if start_loss not in ("full", "first_batch", "none"):
            raise ValueError(f"start_loss must be 'full', 'first_batch' or 'none', got {start_loss!r}")
        self.model = model
        self.lr = lr
        self.batch_size = batch_size
        self.local_steps = local_steps
        self.local_epochs = local_epochs
        self.step = ClientStep(prox_mu, meta, meta_lr, meta_delta)
        self.start_loss = start_loss

    @property
    def batches_per_step(self) -> int:
        return self.step.batches_per_step

    def num_steps(self, n_examples: int) -> int:
        """Steps for the local budget. With `local_epochs` E, E passes over the client's data:
        every step reads k minibatches (k = batches_per_step) of b = min(batch_size, n) examples,
        taken consecutively from the client's stream of epochs, so E epochs are E n examples,
        ceil(E n / (k b)) steps, rounded up so that every example is seen at least floor(E)
        times. That is E ceil(n / B) steps when B divides n or n <= B (a small client's step
        reads all its examples: E steps, one epoch each); otherwise fewer, as no batch is short."""
        if self.local_steps is not None:
            return self.local_steps
        b = min(self.batch_size, n_examples)
        return max(1, math.ceil(self.local_epochs * n_examples / (b * self.batches_per_step)))

    def examples_per_step(self, n_examples: int) -> int:
        """Per-example gradient evaluations in one step: what a device's compute time scales with."""
        return min(self.batch_size, n_examples) * self.step.gradients_per_step

    def batch_indices(self, n_examples: int, batches: int, seed: int) -> np.ndarray:
        """[batches, b] local example indices: consecutive epochs of fresh permutations."""
        b = min(self.batch_size, n_examples)
        return minibatches([n_examples], [batches], [b], mix(seed))[:, 0, :b]

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
        correction: torch.Tensor | None = None,
    ) -> ClientUpdate:
        """Train from w0 on (x, y); `correction` (flat, like w0) is added to every step's gradient."""
        n = len(y)
        planned = self.num_steps(n)
        steps = planned if steps is None else steps
        idx = torch.from_numpy(self.batch_indices(n, steps * self.batches_per_step, seed))

        def grads(params: Layers, slot: int) -> tuple[Layers, torch.Tensor]:
            wg = params[0][0].detach().requires_grad_(True)
            loss = self.model.loss(wg, x[idx[slot]], y[idx[slot]])
            (g,) = torch.autograd.grad(loss, wg)
            return [g.view(1, -1)], loss.detach().view(1)

        # one client, its parameters as one [1, P] "layer": the step is element-wise
        w = w0.clone().view(1, -1)
        starts = [(0, 1, [w0])] if self.step.prox_mu else []
        lr = torch.tensor([self.lr], dtype=w.dtype)
        corr = None if correction is None else [correction.view(1, -1)]
        losses, start_loss = 0.0, self.full_loss(w0, x, y) if self.start_loss == "full" else math.nan
        for h in range(steps):
            loss, first_loss = self.step([w], grads, h, lr, starts, corr)
            if h == 0 and self.start_loss == "first_batch":
                start_loss = float(first_loss)
            losses += float(loss)
        return ClientUpdate(
            client_id=client_id,
            base_version=base_version,
            delta=(w0 - w[0]).detach(),
            n_examples=n,
            steps=steps,
            loss=losses / max(steps, 1),
            start_loss=start_loss,
            planned_steps=planned,
        )

    def full_loss(self, w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> float:
        """Mean loss over all of (x, y) at w, in chunks."""
        return self.model.evaluate(w, x, y)[1]
