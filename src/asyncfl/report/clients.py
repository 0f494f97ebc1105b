"""Per-client evaluation of the final model: the spread that fairness methods (q-FedAvg) try to
shrink, and personalised accuracy, where each client first takes one local step (Per-FedAvg)."""

from __future__ import annotations

import numpy as np
import torch

from asyncfl.models.flat import FlatModel


def client_accuracies(model: FlatModel, w: torch.Tensor, data, personalize_lr: float | None = None) -> np.ndarray:
    """Accuracy on each client's held-out examples (clients without any are skipped). With
    `personalize_lr`, the model first takes one full-batch gradient step on the client's own
    training examples."""
    accs = []
    for k in range(data.num_clients):
        if len(data.client_test_indices[k]) == 0:
            continue
        x, y = data.client_test_data(k)
        wk = w
        if personalize_lr is not None:
            xt, yt = data.client_data(k)
            wg = w.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                (g,) = torch.autograd.grad(model.loss(wg, xt, yt), wg)
            wk = w - personalize_lr * g
        accs.append(model.evaluate(wk, x, y)[0])
    return np.array(accs)


def spread(accs: np.ndarray) -> dict:
    return {
        "clients": int(len(accs)),
        "mean": float(accs.mean()),
        "std": float(accs.std()),
        "p10": float(np.percentile(accs, 10)),
        "min": float(accs.min()),
    }
