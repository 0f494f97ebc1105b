"""PyTorch's fused recurrent layers (nn.GRU, nn.LSTM) computed from basic ops, so that vmap can
train them per client: torch.func has no batching rule for the fused kernels. Same gate order
and equations as PyTorch's documentation; the probe in `kernels.build_kernel` checks the result
against the fused layer on every model it batches."""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _gru_cell(m: nn.GRU, layer: int, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    gx = nn.functional.linear(x, getattr(m, f"weight_ih_l{layer}"), getattr(m, f"bias_ih_l{layer}", None))
    gh = nn.functional.linear(h, getattr(m, f"weight_hh_l{layer}"), getattr(m, f"bias_hh_l{layer}", None))
    xr, xz, xn = gx.chunk(3, -1)
    hr, hz, hn = gh.chunk(3, -1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h


def _lstm_cell(m: nn.LSTM, layer: int, x: torch.Tensor, state: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    h, c = state
    gates = nn.functional.linear(x, getattr(m, f"weight_ih_l{layer}"), getattr(m, f"bias_ih_l{layer}", None))
    gates = gates + nn.functional.linear(h, getattr(m, f"weight_hh_l{layer}"), getattr(m, f"bias_hh_l{layer}", None))
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def _forward(self: nn.RNNBase, x: torch.Tensor, hx=None):
    """nn.GRU / nn.LSTM forward on batched input ([B, T, E] or [T, B, E]), unidirectional,
    without projections or inter-layer dropout."""
    lstm = isinstance(self, nn.LSTM)
    seq = x.transpose(0, 1) if self.batch_first else x  # [T, B, E]
    zeros = seq.new_zeros(self.num_layers, seq.shape[1], self.hidden_size)
    if hx is None:
        hx = (zeros, zeros) if lstm else zeros
    finals_h, finals_c = [], []
    for layer in range(self.num_layers):
        state = (hx[0][layer], hx[1][layer]) if lstm else hx[layer]
        outs = []
        for t in range(seq.shape[0]):
            state = _lstm_cell(self, layer, seq[t], state) if lstm else _gru_cell(self, layer, seq[t], state)
            outs.append(state[0] if lstm else state)
        seq = torch.stack(outs)
        finals_h.append(state[0] if lstm else state)
        if lstm:
            finals_c.append(state[1])
    out = seq.transpose(0, 1) if self.batch_first else seq
    h_n = torch.stack(finals_h)
    return (out, (h_n, torch.stack(finals_c))) if lstm else (out, h_n)


def unfusable(m: nn.Module) -> bool:
    """Whether `_forward` computes this layer: a GRU or LSTM, one direction, no projection, no
    dropout between layers."""
    if type(m) not in (nn.GRU, nn.LSTM):
        return False
    return not m.bidirectional and getattr(m, "proj_size", 0) == 0 and (m.dropout == 0 or m.num_layers == 1)


@contextmanager
def unfused(module: nn.Module) -> Iterator[None]:
    """Within the block, the module's GRU and LSTM layers run `_forward` (an instance attribute
    shadowing the class's forward), then their own again."""
    layers = [m for m in module.modules() if unfusable(m)]
    for m in layers:
        m.forward = types.MethodType(_forward, m)
    try:
        yield
    finally:
        for m in layers:
            del m.forward
