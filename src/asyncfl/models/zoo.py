"""Small models for the bundled tasks. Inputs arrive flat; models reshape what they need."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class LogisticRegression(nn.Module):
    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.fc(x)


class MLP(nn.Module):
    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (64,)):
        super().__init__()
        dims = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions and a linear head, sized for 8x8 to 28x28 single-channel images."""

    def __init__(self, in_features: int, num_classes: int, channels: int = 1, width: int = 16):
        super().__init__()
        self.channels, self.side = channels, _square_side(in_features, channels, "cnn")
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        pooled = self.side // 2
        self.fc = nn.Linear(2 * width * pooled * pooled, num_classes)

    def forward(self, x):
        x = x.reshape(-1, self.channels, self.side, self.side)
        x = torch.relu(self.conv1(x))
        x = torch.nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


def _square_side(in_features: int, channels: int, name: str) -> int:
    side = int(round((in_features / channels) ** 0.5))
    if side * side * channels != in_features:
        raise ValueError(f"{name} needs square images: {in_features} features, {channels} channels")
    return side


class FemnistCNN(nn.Module):
    """LEAF's FEMNIST model: 5x5 convolutions of 32 and 64 channels, each followed by 2x2 max
    pooling, a 2048-unit dense layer and the 62-way output."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.side = _square_side(in_features, 1, "femnist_cnn")
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * (self.side // 4) ** 2, 2048)
        self.fc2 = nn.Linear(2048, num_classes)

    def forward(self, x):
        x = x.reshape(-1, 1, self.side, self.side)
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class CifarCNN(nn.Module):
    """The CIFAR-10 network of FedAsync's experiments (the classic TensorFlow tutorial shape, without
    its local response normalisation): 5x5 convolutions of 64 and 64 channels with 3x3 stride-2
    max pooling, dense layers of 384 and 192 units."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.side = _square_side(in_features, 3, "cifar_cnn")
        self.conv1 = nn.Conv2d(3, 64, 5, padding=2)
        self.conv2 = nn.Conv2d(64, 64, 5, padding=2)
        pooled = ((self.side + 1) // 2 + 1) // 2
        self.fc1 = nn.Linear(64 * pooled * pooled, 384)
        self.fc2 = nn.Linear(384, 192)
        self.fc3 = nn.Linear(192, num_classes)

    def forward(self, x):
        x = x.reshape(-1, 3, self.side, self.side)
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 3, 2, padding=1)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 3, 2, padding=1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


class CharGRU(nn.Module):
    """Next-character model for Shakespeare: an embedding, a single-layer GRU and a linear head
    on the last state. The GRU is PyTorch's (gates reset r, update z, new n; r scales the
    recurrent part of n; h' = (1 - z) n + z h), written from basic ops: the fused nn.GRU cannot
    be vmapped over per-client weights, and is no faster on CPU for small batches.

    Three paths compute the same function: `forward` (autograd; the sequential executor and the
    reference), `stacked_forward` (J clients' parameters at once) and `stacked_grads` (J clients'
    gradients by hand-written backpropagation through time, which the batched executor uses:
    autograd's per-op bookkeeping over 80 time steps costs more than the arithmetic)."""

    def __init__(self, in_features: int, num_classes: int, vocab: int | None = None, embed: int = 8, hidden: int = 128):
        super().__init__()
        self.hidden = hidden
        self.embed = nn.Embedding(vocab or num_classes, embed)
        self.inp = nn.Linear(embed, 3 * hidden)  # input contributions to reset, update, new gates
        self.rec = nn.Linear(hidden, 3 * hidden)  # recurrent contributions
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        gates_x = self.inp(self.embed(x.long()))  # [B, T, 3H], all steps at once
        return self.head(self._recur(gates_x, lambda h: self.rec(h)))

    def _recur(self, gates_x: torch.Tensor, rec) -> torch.Tensor:
        """The GRU over time; gates_x is [..., T, 3H], rec maps a state [..., H] to [..., 3H].
        Few ops per step (one sigmoid for r and z, addcmul, lerp): their count sets the cost."""
        hd = self.hidden
        h = gates_x.new_zeros(*gates_x.shape[:-2], hd)
        for t in range(gates_x.shape[-2]):
            gx, gh = gates_x[..., t, :], rec(h)
            rz = torch.sigmoid(gx[..., : 2 * hd] + gh[..., : 2 * hd])
            n = torch.tanh(torch.addcmul(gx[..., 2 * hd :], rz[..., :hd], gh[..., 2 * hd :]))
            h = torch.lerp(n, h, rz[..., hd:])  # (1 - z) n + z h
        return h

    def stacked_forward(self, p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The same model for J clients at once, each with its own parameters p[name][j]: batched
        matmuls instead of vmap, whose per-op cost dominates over 80 time steps."""
        j, b, t = x.shape
        vocab = p["embed.weight"].shape[1]
        rows = x.long() + (torch.arange(j) * vocab).view(j, 1, 1)
        e = p["embed.weight"].reshape(j * vocab, -1)[rows]  # [J, B, T, E]
        gates_x = torch.baddbmm(
            p["inp.bias"].unsqueeze(1), e.reshape(j, b * t, -1), p["inp.weight"].transpose(1, 2)
        ).view(j, b, t, -1)
        w_rec, b_rec = p["rec.weight"].transpose(1, 2), p["rec.bias"].unsqueeze(1)
        h = self._recur(gates_x, lambda h: torch.baddbmm(b_rec, h, w_rec))
        return torch.baddbmm(p["head.bias"].unsqueeze(1), h, p["head.weight"].transpose(1, 2))

    @torch.no_grad()
    def stacked_grads(
        self, p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, a: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Gradients of loss_j = sum_b a[j, b] ce(f(p_j, x[j, b]), y[j, b]) for J clients at once
        (x [J, B, T] ids, y and a [J, B]), in parameter order, and the losses [J].

        Forward: the input gates of a character do not depend on time, so they are a table
        [J, vocab, 3H] (embedding times input weights, plus biases) gathered per position. Every
        step's gates and states stay in [J, T, B, .] buffers. Backward loops over time with one
        batched matmul per step for the state gradient; the weight gradients are single matmuls
        over all steps at the end. No autograd graph, and every large intermediate is written
        into a workspace kept between calls (fresh allocations of this size cost page faults)."""
        emb, w_in, b_in = p["embed.weight"], p["inp.weight"], p["inp.bias"]
        w_rec, b_rec, w_out, b_out = p["rec.weight"], p["rec.bias"], p["head.weight"], p["head.bias"]
        j, b, steps = x.shape
        vocab, hd = emb.shape[1], self.hidden
        ws = self._workspace(j, b, steps, vocab)
        gx, hs, rz, ns, ghn, gh = ws["gx"], ws["hs"], ws["rz"], ws["ns"], ws["ghn"], ws["gh"]
        # input gates per character; the recurrent biases of r and z join them (they only add)
        table = torch.baddbmm(b_in.unsqueeze(1), emb, w_in.transpose(1, 2))  # [J, V, 3H]
        table[..., : 2 * hd] += b_rec[:, None, : 2 * hd]
        rows = (x.long() + (torch.arange(j) * vocab).view(j, 1, 1)).transpose(1, 2).reshape(-1)  # [J, T, B]
        torch.index_select(table.view(j * vocab, 3 * hd), 0, rows, out=gx.view(-1, 3 * hd))
        w_rec_t = w_rec.transpose(1, 2).contiguous()  # [J, H, 3H]
        b_hn = b_rec[:, None, 2 * hd :]
        for t in range(steps):
            h, r_z, n, g_n = hs[:, t], rz[:, t], ns[:, t], ghn[:, t]
            torch.bmm(h, w_rec_t, out=gh)
            torch.add(gh[..., 2 * hd :], b_hn, out=g_n)  # recurrent part of the new gate, before r
            torch.add(gx[:, t, :, : 2 * hd], gh[..., : 2 * hd], out=r_z).sigmoid_()
            torch.addcmul(gx[:, t, :, 2 * hd :], r_z[..., :hd], g_n, out=n).tanh_()
            torch.lerp(n, h, r_z[..., hd:], out=hs[:, t + 1])  # (1 - z) n + z h
        last = hs[:, steps]
        logits = torch.baddbmm(b_out.unsqueeze(1), last, w_out.transpose(1, 2))  # [J, B, C]
        logp = torch.log_softmax(logits, -1)
        y = y.long().unsqueeze(2)
        per = -(logp.gather(2, y).squeeze(2) * a).sum(1)
        d = logp.exp_()
        d.scatter_add_(2, y, torch.full_like(d[..., :1], -1.0))
        d.mul_(a.unsqueeze(2))  # d loss / d logits
        g_out_w = torch.bmm(d.transpose(1, 2), last)
        g_out_b = d.sum(1)
        dh, dh_next = ws["dh"], ws["dh_next"]
        torch.bmm(d, w_out, out=dh)  # [J, B, H]
        # backward through time: dg[:, t] = d loss / d (recurrent gates) = [da_r, da_z, da_n r],
        # dan[:, t] = d loss / d (new-gate pre-activation), which is also its input-gate gradient
        dg, dan, t1, t2, s2, back = ws["dg"], ws["dan"], ws["t1"], ws["t2"], ws["s2"], ws["back"]
        w_rec_c = w_rec.contiguous()  # [J, 3H, H]
        for t in range(steps - 1, -1, -1):
            r_z, n, h, g, da_n = rz[:, t], ns[:, t], hs[:, t], dg[:, t], dan[:, t]
            torch.addcmul(dh, dh, r_z[..., hd:], value=-1.0, out=t1)  # d n = dh (1 - z)
            torch.mul(n, n, out=t2)
            torch.addcmul(t1, t1, t2, value=-1.0, out=da_n)  # d n (1 - n^2)
            torch.mul(da_n, ghn[:, t], out=g[..., :hd])  # d r
            torch.sub(h, n, out=t2)
            torch.mul(dh, t2, out=g[..., hd : 2 * hd])  # d z
            torch.addcmul(r_z, r_z, r_z, value=-1.0, out=s2)  # sigmoid' = s (1 - s)
            g[..., : 2 * hd].mul_(s2)
            torch.mul(da_n, r_z[..., :hd], out=g[..., 2 * hd :])
            torch.bmm(g, w_rec_c, out=back)
            torch.addcmul(back, dh, r_z[..., hd:], out=dh_next)  # through the matmul and through z h
            dh, dh_next = dh_next, dh
        flat_g = dg.view(j, steps * b, 3 * hd)
        g_rec_w = torch.bmm(flat_g.transpose(1, 2), hs[:, :steps].reshape(j, steps * b, hd))
        g_rec_b = flat_g.sum(1)
        dg[..., 2 * hd :] = dan  # now the input-gate gradients [da_r, da_z, da_n]
        d_table = ws["d_table"].zero_().index_add_(0, rows, dg.view(-1, 3 * hd)).view(j, vocab, 3 * hd)
        g_in_w = torch.bmm(d_table.transpose(1, 2), emb)
        g_in_b = d_table.sum(1)
        g_emb = torch.bmm(d_table, w_in)
        grads = {
            "embed.weight": g_emb,
            "inp.weight": g_in_w,
            "inp.bias": g_in_b,
            "rec.weight": g_rec_w,
            "rec.bias": g_rec_b,
            "head.weight": g_out_w,
            "head.bias": g_out_b,
        }
        return [grads[name] for name in p], per

    def _workspace(self, j: int, b: int, steps: int, vocab: int) -> dict[str, torch.Tensor]:
        """Buffers for `stacked_grads` (views of the first j clients' rows), reused while batch,
        length and vocabulary stay and regrown when a pass has more clients than any before.
        A plain attribute, not a registered buffer: it is scratch, not model state."""
        key = (b, steps, vocab)
        cached = getattr(self, "_scratch", None)
        if cached is None or cached[0] != key or cached[1] < j:
            self._scratch = None  # free the old buffers first
            hd = self.hidden
            shapes = {
                "gx": (steps, b, 3 * hd),
                "hs": (steps + 1, b, hd),
                "rz": (steps, b, 2 * hd),
                "ns": (steps, b, hd),
                "ghn": (steps, b, hd),
                "gh": (b, 3 * hd),
                "dg": (steps, b, 3 * hd),
                "dan": (steps, b, hd),
                "dh": (b, hd),
                "dh_next": (b, hd),
                "t1": (b, hd),
                "t2": (b, hd),
                "s2": (b, 2 * hd),
                "back": (b, hd),
                "d_table": (vocab, 3 * hd),
            }
            # hs[:, 0] (the initial state) is never written: zeros once
            cached = (
                key,
                j,
                {name: (torch.zeros if name == "hs" else torch.empty)(j, *shape) for name, shape in shapes.items()},
            )
            self._scratch = cached
        ws = {name: t[:j] for name, t in cached[2].items()}
        ws["d_table"] = ws["d_table"].view(j * vocab, -1)
        return ws


MODELS: dict[str, Callable[..., nn.Module]] = {
    "logreg": LogisticRegression,
    "mlp": MLP,
    "cnn": SmallCNN,
    "femnist_cnn": FemnistCNN,
    "cifar_cnn": CifarCNN,
    "char_gru": CharGRU,
}


def build_model(name: str, in_features: int, num_classes: int, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](in_features, num_classes, **kwargs)
