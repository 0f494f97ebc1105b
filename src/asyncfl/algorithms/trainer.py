"""The one local trainer every algorithm and both runtimes share.

Minibatch SGD with the algorithm's client-side terms (`ClientStep`), run for one client on its
flat parameter vector. The minibatch order is a pure function of (n_examples, steps, seed)
(`shuffle.minibatches`; `shuffle.epoch_batches` with `local_epochs`), so a deferred or batched
execution of the same client gives the same result.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from asyncfl.algorithms.client_step import ClientStep, Layers
from asyncfl.algorithms.shuffle import epoch_batches, minibatches, mix
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

    def num_batches(self, n_examples: int) -> int:
        """Minibatches of the local budget in epochs mode, as the reference FedAvg loop takes them:
        each epoch a fresh permutation cut into ceil(n / B) batches, the last one short when B
        does not divide n. A fractional E adds the first ceil(frac(E) ceil(n / B)) batches of
        one more epoch (frac(E) rounded to 9 digits, so that 1.1 is not read as 1.1000...01)."""
        per_epoch = -(-n_examples // self.batch_size)
        whole = math.floor(self.local_epochs)
        return whole * per_epoch + math.ceil(round((self.local_epochs - whole) * per_epoch, 9))

    def num_steps(self, n_examples: int) -> int:
        """Steps for the local budget: `local_steps`, or in epochs mode the steps that read the
        epochs' batches, k (= batches_per_step: Per-FedAvg's 2 or 3) consecutive batches a step,
        ceil(batches / k) (the last step reads on into the next epoch); at least one."""
        if self.local_steps is not None:
            return self.local_steps
        return max(1, -(-self.num_batches(n_examples) // self.batches_per_step))

    def batch_sizes(self, n_examples: int, batches: int) -> np.ndarray:
        """Examples in each of the first `batches` minibatches: b = min(B, n) with `local_steps`;
        in epochs mode B, ..., B, n - B (ceil(n / B) - 1) per epoch. A step's loss is the mean
        over its batch's actual examples."""
        if self.local_epochs is None:
            return np.full(batches, min(self.batch_size, n_examples))
        per_epoch = -(-n_examples // self.batch_size)
        epoch = np.full(per_epoch, self.batch_size)
        epoch[-1] = n_examples - self.batch_size * (per_epoch - 1)
        return np.resize(epoch, batches)

    def examples_per_step(self, n_examples: int) -> float:
        """Per-example gradient evaluations in one step, what a device's compute time scales
        with: b times the step's gradients with `local_steps`; in epochs mode the mean over the
        trip's steps (short batches cost less), so that steps x this is the trip's exact work."""
        if self.local_steps is not None:
            return min(self.batch_size, n_examples) * self.step.gradients_per_step
        steps, k = self.num_steps(n_examples), self.batches_per_step
        sizes = self.batch_sizes(n_examples, steps * k).reshape(steps, k)
        return float((sizes @ np.array(self.step.gradients_per_batch)).sum()) / steps

    def batch_indices(self, n_examples: int, batches: int, seed: int) -> np.ndarray:
        """[batches, b] local example indices, b = min(B, n): with `local_steps` consecutive
        epochs of fresh permutations, batches straddling them; in epochs mode each epoch cut
        into its own batches, a short one padded with 0 past `batch_sizes`."""
        if self.local_epochs is not None:
            return epoch_batches(n_examples, batches, self.batch_size, mix(seed))
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
        batches = steps * self.batches_per_step
        idx = torch.from_numpy(self.batch_indices(n, batches, seed))
        # epochs mode: a short batch's row is padded past its size
        sizes = None if self.local_epochs is None else self.batch_sizes(n, batches).tolist()

        def grads(params: Layers, slot: int) -> tuple[Layers, torch.Tensor]:
            wg = params[0][0].detach().requires_grad_(True)
            rows = idx[slot] if sizes is None else idx[slot, : sizes[slot]]
            loss = self.model.loss(wg, x[rows], y[rows])
            (g,) = torch.autograd.grad(loss, wg)
            return [g.view(1, -1)], loss.detach().view(1)

        # one client, its parameters as one [1, P] "layer": the step is element-wise
        w = w0.clone().view(1, -1)
        starts = [(0, 1, [w0])] if self.step.prox_mu else []
        lr = torch.tensor([self.lr], dtype=w.dtype)
        corr = None if correction is None else [correction.view(1, -1)]
        losses, start_loss = 0.0, self.full_loss(w0, x, y) if self.start_loss == "full" else math.nan
        with self.model.seeded(seed):
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
