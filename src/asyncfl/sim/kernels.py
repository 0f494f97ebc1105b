"""Kernels for the batched executor: per-client gradients of J clients at once.

Each kernel computes, for stacked per-client parameters ([J, *shape] tensors) and a pass's
minibatches, every client's gradient and loss in one go; `build_kernel` picks the fastest one
that fits the model and proves it against the sequential trainer on a tiny probe.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, vmap

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.models.flat import FlatModel
from asyncfl.models.zoo import MLP, LogisticRegression
from asyncfl.sim.unfused import unfused


class NotVectorisable(Exception):
    """The model cannot be trained per client under vmap with a result we can trust."""


class Kernel:
    """Holds per-client parameters as a list of [J, *shape] tensors during a pass."""

    mixes_examples = True  # whether padded examples could leak into real ones

    def __init__(self, model: FlatModel):
        self.model = model

    def split(self, w: torch.Tensor) -> list[torch.Tensor]:
        """[J, P] stacked flat vectors to per-layer [J, *shape] tensors with their own storage."""
        j = w.shape[0]
        return [t.reshape(j, *s).clone() for t, s in zip(torch.split(w, self.model.sizes, 1), self.model.shapes)]

    def grads(self, ws: list[torch.Tensor], x, y, a, out=None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-client gradients of sum_b a[j, b] ce(f(w_j, x[j, b]), y[j, b]) and those losses;
        `out` optionally holds buffers to write the gradients into."""
        raise NotImplementedError


class FuncKernel(Kernel):
    """Any parameter-only module: vmap over the forward, one autograd backward for all clients
    (their losses are independent, so the gradient of the sum is each client's gradient)."""

    def __init__(self, model: FlatModel):
        super().__init__(model)
        names = model.names

        def fwd(params, x):
            with unfused(model.module):
                return functional_call(model.module, dict(zip(names, params)), (x,))

        self.fwd = vmap(fwd)

    def grads(self, ws, x, y, a, out=None):
        with torch.enable_grad():
            leaves = [w.detach().requires_grad_(True) for w in ws]
            logits = self.fwd(leaves, x)
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(a)
            per = (ce * a).sum(1)
            return list(torch.autograd.grad(per.sum(), leaves)), per.detach()


class StackedKernel(Kernel):
    """Modules that provide `stacked_forward(params, x)` (J clients' parameters as [J, ...]
    tensors, x as [J, B, ...]): plain autograd over the stacked parameters, no vmap. The
    contract: examples are independent (no batch statistics), so zero-weight padding is inert."""

    mixes_examples = False

    def __init__(self, model: FlatModel):
        super().__init__(model)
        self.names = model.names

    def grads(self, ws, x, y, a, out=None):
        with torch.enable_grad():
            leaves = [w.detach().requires_grad_(True) for w in ws]
            logits = self.model.module.stacked_forward(dict(zip(self.names, leaves)), x)
            ce = nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(a)
            per = (ce * a).sum(1)
            return list(torch.autograd.grad(per.sum(), leaves)), per.detach()


class ModelGradsKernel(Kernel):
    """Modules that provide `stacked_grads(params, x, y, a)`: their own batched gradients (e.g. a
    recurrent net with hand-written backpropagation through time, where autograd's per-op
    bookkeeping over many time steps dominates). Returns the gradients in parameter order and
    the per-client losses sum_b a[j, b] ce(...); the probe in `build_kernel` checks them."""

    mixes_examples = False

    def grads(self, ws, x, y, a, out=None):
        return self.model.module.stacked_grads(dict(zip(self.model.names, ws)), x, y, a)


class ChainKernel(Kernel):
    """Linear/ReLU chains (logreg, MLP) with hand-written batched matmuls: about twice as fast
    as the generic path because nothing is traced per step."""

    mixes_examples = False

    def __init__(self, model: FlatModel, ops: list[str]):
        super().__init__(model)
        self.ops = ops  # "linear" (consumes weight, bias) or "relu"

    def forward(self, ws, x, saved: list | None = None):
        h, p = x, 0
        for op in self.ops:
            if op == "linear":
                if saved is not None:
                    saved.append((op, h, p))
                h = torch.baddbmm(ws[p + 1].unsqueeze(1), h, ws[p].transpose(1, 2))
                p += 2
            else:
                h = torch.relu(h)
                if saved is not None:
                    saved.append((op, h, None))
        return h

    def grads(self, ws, x, y, a, out=None):
        saved: list = []
        h = self.forward(ws, x, saved)
        logp = torch.log_softmax(h, -1)
        per = -(logp.gather(2, y.unsqueeze(2)).squeeze(2) * a).sum(1)
        d = logp.exp_()
        d.scatter_add_(2, y.unsqueeze(2), torch.full_like(d[..., :1], -1.0))
        d.mul_(a.unsqueeze(2))
        g = out if out is not None else [torch.empty_like(w) for w in ws]
        for i in range(len(self.ops) - 1, -1, -1):
            op, t, p = saved[i]
            if op == "linear":
                torch.bmm(d.transpose(1, 2), t, out=g[p])  # reused buffers: no page faults per step
                torch.sum(d, 1, out=g[p + 1])
                if i > 0:
                    d = torch.bmm(d, ws[p])
            else:
                d = d * (t > 0)
        return g, per


def _chain_ops(module: nn.Module) -> list[str] | None:
    # only modules whose forward is known to be the chain: a custom forward may do anything
    if type(module) not in (nn.Sequential, MLP, LogisticRegression):
        return None
    leaves = [m for m in module.modules() if not list(m.children())]
    ops = []
    for m in leaves:
        if type(m) is nn.Linear and m.bias is not None:
            ops.append("linear")
        elif type(m) is nn.ReLU:
            ops.append("relu")
        else:
            return None
    if not ops or ops[-1] != "linear":
        return None
    # the parameter order must be weight, bias per Linear, in module order
    expected = [n for m in leaves if isinstance(m, nn.Linear) for n in ("weight", "bias")]
    names = [n.rsplit(".", 1)[-1] for n, _ in module.named_parameters()]
    return ops if names == expected else None


def activation_floats(module: nn.Module, sample_x: torch.Tensor) -> int:
    """Floats of activation produced per example, measured with forward hooks."""
    total = 0

    def hook(_m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out[0].numel() if out.dim() > 1 else out.numel()

    hs = [m.register_forward_hook(hook) for m in module.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            module(sample_x[:2])
    finally:
        for h in hs:
            h.remove()
    return max(total, 1)


def _refuse_layers(module: nn.Module) -> None:
    """Layers a vmapped pass cannot train as the sequential executor does, named with the reason."""
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise NotVectorisable(
                f"{name} ({type(m).__name__}) normalises over the batch, and the batched executor's "
                "loss and evaluation forwards batch several clients' examples together"
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            raise NotVectorisable(
                f"{name} ({type(m).__name__}) draws random masks, which vmap cannot draw as the "
                "sequential executor does (per job, from the job's seed)"
            )


def build_kernel(trainer: LocalTrainer, sample_x: torch.Tensor) -> Kernel:
    """Pick a kernel and prove it on a tiny probe against the sequential trainer; raises
    NotVectorisable with the reason when the model cannot be batched faithfully."""
    model = trainer.model
    buffers = [n for n, _ in model.module.named_buffers()]
    if buffers:
        raise NotVectorisable(f"model has buffers ({', '.join(buffers[:3])}), e.g. running statistics")
    _refuse_layers(model.module)
    ops = _chain_ops(model.module)
    if ops:
        kernel: Kernel = ChainKernel(model, ops)
    elif hasattr(model.module, "stacked_grads"):
        kernel = ModelGradsKernel(model)
    elif hasattr(model.module, "stacked_forward"):
        kernel = StackedKernel(model)
    else:
        kernel = FuncKernel(model)
    gen = torch.Generator().manual_seed(0)
    j, b = 2, 3
    w0 = model.initial_weights()
    ws = torch.stack([w0, w0 + 0.01 * torch.randn(w0.shape, generator=gen)])
    x = sample_x[torch.randint(0, len(sample_x), (j, b), generator=gen)]  # real inputs: floats or token ids
    y = torch.randint(0, 2, (j, b), generator=gen)
    a = torch.full((j, b), 1.0 / b)
    try:
        if ops:  # the chain must really be what the module computes
            ref = model.forward(ws[0], x[0])
            got = kernel.forward(kernel.split(ws[:1]), x[:1])[0]
            if not torch.allclose(ref, got, atol=1e-5, rtol=1e-4):
                kernel = FuncKernel(model)
        g, _ = kernel.grads(kernel.split(ws), x, y, a)
        for k in range(j):
            wg = ws[k].clone().requires_grad_(True)
            (ref,) = torch.autograd.grad(model.loss(wg, x[k], y[k]), wg)
            got = torch.cat([t[k].reshape(-1) for t in g])
            if not torch.allclose(ref, got, atol=1e-5, rtol=1e-4):
                raise NotVectorisable("vmapped gradient differs from the sequential one")
    except NotVectorisable:
        raise
    except Exception as err:  # torch.func refuses the model (data-dependent control flow, ...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NotVectorisable(f"torch.func cannot vectorise it: {first[:160]}") from None
    return kernel
