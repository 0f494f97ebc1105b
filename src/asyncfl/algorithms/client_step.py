"""One local step of a client, for J clients at once: the only place the step's rule lives.

Parameters are stacked per client: a list of [J, *shape] tensors, any split of the parameter
vector (the batched executor passes one per layer, the sequential trainer one flat [1, P]), as
every operation is element-wise. Both executors run this step: the sequential trainer with J = 1
and autograd as its gradient function, the batched executor with J clients and a vectorised
kernel. The step updates the parameters in place and adds to the gradients it is given in
place, so a gradient function may write into reused buffers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Layers = list[torch.Tensor]
# grads(params, batch slot) -> (per-layer [J, *shape] gradients, [J] per-client mean losses)
GradFn = Callable[[Layers, int], tuple[Layers, torch.Tensor]]
# (first row, end row, per-layer start model without the J axis): rows that share a start model
StartSegment = tuple[int, int, Sequence[torch.Tensor]]


class ClientStep:
    """Plain or proximal SGD; with `meta` set, Per-FedAvg's MAML-style step instead.

    Per-FedAvg (Fallah et al. 2020) trains for a model that does well after one more local step
    of size `meta_lr`: each step takes an inner step on one minibatch, evaluates the gradient
    at the result on a second, and steps the model with it ("fo", first order) or with it
    corrected by the Hessian-vector product on a third minibatch ("hf", Hessian-free: the
    product is a central difference of two gradients, step `meta_delta`).

    The gradient the model steps with is then: that gradient, plus a per-client `correction`
    constant if given (SCAFFOLD's c - c_i), plus the proximal pull prox_mu (w - w_start) (FedProx
    mu / FedAsync rho).
    """

    # a step's minibatches, and the gradient evaluations on each ("hf" takes two on its third)
    GRADIENTS_PER_BATCH = {None: (1,), "fo": (1, 1), "hf": (1, 1, 2)}

    def __init__(self, prox_mu: float = 0.0, meta: str | None = None, meta_lr: float = 0.01, meta_delta: float = 1e-3):
        if meta not in self.GRADIENTS_PER_BATCH:
            raise ValueError(f"meta must be None, 'fo' or 'hf', got {meta!r}")
        self.prox_mu = prox_mu
        self.meta = meta
        self.meta_lr = meta_lr
        self.meta_delta = meta_delta

    @property
    def batches_per_step(self) -> int:
        """Minibatches one step reads: batch slots h k ... h k + k - 1 for step h."""
        return len(self.gradients_per_batch)

    @property
    def gradients_per_batch(self) -> tuple[int, ...]:
        return self.GRADIENTS_PER_BATCH[self.meta]

    @property
    def gradients_per_step(self) -> int:
        return sum(self.gradients_per_batch)

    def __call__(
        self,
        params: Layers,
        grads: GradFn,
        h: int,
        lr: torch.Tensor,
        starts: Sequence[StartSegment] = (),
        correction: Layers | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step h in place for every client, with per-client learning rates `lr` [J] (0: the
        client does not step). `starts` must cover the rows when prox_mu is set. Returns the
        step's per-client losses and the losses at the parameters on the step's first batch
        (the same tensor without `meta`)."""
        k = self.batches_per_step
        g, loss = grads(params, h * k)
        first_loss = loss
        if self.meta:
            g, loss = grads([w - self.meta_lr * gw for w, gw in zip(params, g)], h * k + 1)
            if self.meta == "hf":
                d = self.meta_delta
                g_plus, _ = grads([w + d * gw for w, gw in zip(params, g)], h * k + 2)
                g_minus, _ = grads([w - d * gw for w, gw in zip(params, g)], h * k + 2)
                g = [gw - self.meta_lr / (2 * d) * (p - m) for gw, p, m in zip(g, g_plus, g_minus)]
        for i, (w, gw) in enumerate(zip(params, g)):
            if correction is not None:
                gw.add_(correction[i])
            if self.prox_mu:  # towards each client's own start model
                for a, b, base in starts:
                    gw[a:b].add_(w[a:b] - base[i], alpha=self.prox_mu)
            w.addcmul_(lr.view(-1, *[1] * (w.dim() - 1)), gw, value=-1.0)  # one pass, in place
        return loss, first_loss
