"""CharGRU's hand-written backpropagation through time (`stacked_grads`, what the batched
executor trains Shakespeare with) against autograd over the module's own forward."""

import pytest
import torch
from torch import nn

from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.models import FlatModel
from asyncfl.models.zoo import CharGRU
from asyncfl.sim.batched import BatchedExecutor
from asyncfl.sim.executor import SequentialExecutor, TrainJob
from asyncfl.sim.kernels import ModelGradsKernel, build_kernel


def stacked(model: FlatModel, ws: torch.Tensor) -> dict[str, torch.Tensor]:
    j = ws.shape[0]
    return {n: t.reshape(j, *s) for n, t, s in zip(model.names, torch.split(ws, model.sizes, 1), model.shapes)}


def autograd_reference(model: FlatModel, w, x, y, a):
    """Gradient and value of sum_b a[b] ce(f(w, x[b]), y[b]) by autograd through `forward`."""
    wg = w.clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(model.forward(wg, x), y, reduction="none")
    loss = (ce * a).sum()
    (g,) = torch.autograd.grad(loss, wg)
    return g, float(loss.detach())


@pytest.mark.parametrize(
    "j,b,t,hidden,embed", [(1, 1, 1, 4, 2), (2, 3, 5, 8, 4), (3, 4, 80, 16, 8), (5, 2, 7, 32, 3), (4, 16, 80, 64, 8)]
)
def test_stacked_grads_equal_autograd_with_zero_weight_padding(j, b, t, hidden, embed):
    gen = torch.Generator().manual_seed(j * 100 + t)
    torch.manual_seed(0)
    model = FlatModel(CharGRU(t, 97, vocab=97, embed=embed, hidden=hidden))
    w0 = model.initial_weights()
    ws = w0 + 0.3 * torch.randn(j, w0.numel(), generator=gen)  # distinct clients, saturating gates too
    x = torch.randint(0, 97, (j, b, t), generator=gen)
    y = torch.randint(0, 97, (j, b), generator=gen)
    a = torch.rand(j, b, generator=gen)
    if b > 1:
        a[0, -1] = 0.0  # padded examples (clients with fewer examples than the batch) weigh zero
        a[-1, b // 2 :] = 0.0
    grads, losses = model.module.stacked_grads(stacked(model, ws), x, y, a)
    assert [tuple(g.shape) for g in grads] == [(j, *s) for s in model.shapes]
    for k in range(j):
        ref, loss = autograd_reference(model, ws[k], x[k], y[k], a[k])
        got = torch.cat([g[k].reshape(-1) for g in grads])
        assert torch.allclose(got, ref, atol=1e-5, rtol=1e-4), (k, (got - ref).abs().max())
        assert float(losses[k]) == pytest.approx(loss, rel=1e-5, abs=1e-6)


def test_padding_is_inert_and_the_workspace_is_reused_safely():
    """Changing a zero-weight example's input or label changes nothing; a second call with
    another shape, then the first again, gives the same result (scratch buffers are reused)."""
    torch.manual_seed(0)
    model = FlatModel(CharGRU(80, 97, vocab=97, embed=8, hidden=16))
    ws = model.initial_weights().repeat(3, 1)
    x = torch.randint(0, 97, (3, 4, 80))
    y = torch.randint(0, 97, (3, 4))
    a = torch.tensor([[0.25] * 4, [0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    g1, l1 = model.module.stacked_grads(stacked(model, ws), x, y, a)
    x2, y2 = x.clone(), y.clone()
    x2[1, 2:], y2[1, 2:], x2[2, 1:] = 7, 3, 11
    model.module.stacked_grads(stacked(model, ws[:2]), x[:2, :, :9], y[:2], a[:2])  # another shape
    g2, l2 = model.module.stacked_grads(stacked(model, ws), x2, y2, a)
    assert torch.equal(l1, l2)
    for u, v in zip(g1, g2):
        assert torch.equal(u, v)
    # fewer clients than the workspace holds: its first rows serve
    g3, l3 = model.module.stacked_grads(stacked(model, ws[1:]), x2[1:], y2[1:], a[1:])
    assert torch.allclose(l3, l1[1:])
    for u, v in zip(g1, g3):
        assert torch.allclose(u[1:], v, atol=1e-7)


def test_batched_executor_uses_the_hand_written_kernel_and_matches_sequential():
    from asyncfl.data.federated import FederatedDataset

    gen = torch.Generator().manual_seed(1)
    sizes = [3, 20, 9, 40, 1]  # clients smaller than the batch: zero-weight padding in the pass
    x = torch.randint(0, 97, (sum(sizes), 80), generator=gen)
    y = torch.randint(0, 97, (sum(sizes),), generator=gen)
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    parts = [torch.arange(bounds[i], bounds[i + 1]).numpy() for i in range(len(sizes))]
    data = FederatedDataset(x, y, parts, x[:30], y[:30], 97)
    torch.manual_seed(0)
    model = FlatModel(CharGRU(80, 97, vocab=97, embed=8, hidden=24))
    trainer = LocalTrainer(model, 0.5, 8, local_steps=4)
    assert isinstance(build_kernel(trainer, data.x_test[:8]), ModelGradsKernel)
    w0 = model.initial_weights()
    seq, bat = SequentialExecutor(trainer, data), BatchedExecutor(trainer, data)
    jobs = [TrainJob(k, k % len(sizes), 0, w0, 50 + k, 1 + k % 4) for k in range(10)]
    for ex in (seq, bat):
        for job in jobs:
            ex.submit(TrainJob(job.job_id, job.client, 0, w0, job.seed, job.steps))
    for job in jobs:
        u, v = seq.result(job.job_id), bat.result(job.job_id)
        assert u.steps == v.steps and torch.allclose(u.delta, v.delta, atol=2e-6, rtol=1e-4)
        assert u.loss == pytest.approx(v.loss, abs=1e-5)


def test_the_three_paths_compute_one_function():
    """forward (per client), stacked_forward (J clients) and the loss stacked_grads reports."""
    torch.manual_seed(0)
    model = FlatModel(CharGRU(80, 97, vocab=97, embed=8, hidden=16))
    ws = model.initial_weights() + 0.2 * torch.randn(3, model.numel)
    x = torch.randint(0, 97, (3, 5, 80))
    y = torch.randint(0, 97, (3, 5))
    a = torch.full((3, 5), 0.2)
    logits = model.module.stacked_forward(stacked(model, ws), x)
    _, losses = model.module.stacked_grads(stacked(model, ws), x, y, a)
    for k in range(3):
        ref = model.forward(ws[k], x[k])
        assert torch.allclose(logits[k], ref, atol=1e-5)
        ce = nn.functional.cross_entropy(ref, y[k])
        assert float(losses[k]) == pytest.approx(float(ce), rel=1e-5)
