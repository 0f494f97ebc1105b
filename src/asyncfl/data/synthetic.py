"""Synthetic(alpha, beta) of the FedProx / LEAF papers, lazy and deterministic per device.

Device k draws u_k ~ N(0, alpha) and B_k ~ N(0, beta) (alpha, beta are variances); its model
W_k [classes x features] and b_k have entries ~ N(u_k, 1); its feature mean v_k has entries
~ N(B_k, 1); its examples are x ~ N(v_k, Sigma) with Sigma diagonal, Sigma_jj = j^-1.2
(j = 1..features), and y = argmax softmax(W_k x + b_k). alpha controls how much local models
differ, beta how much local feature distributions differ. (A shift u_k common to every class
cancels in the argmax, so in practice beta and the N(., 1) draws drive heterogeneity.)

In that generator nothing links one device's labels to another's, so a single global model
scores chance on devices held out of training (0.08-0.09 on 10 classes whatever alpha and
beta) and no "time to target accuracy" exists. `common_model` = lambda > 0 adds a model that
all devices share: device k labels with W_k + lambda W and b_k + lambda b, W and b N(0, 1)
drawn once from (seed, 4). Everything else is unchanged draw for draw, so lambda = 0 is the
FedProx generator. The shared model alone predicts 0.45 / 0.68 / 0.76 / 0.84 of a held-out
device's labels at lambda = 1 / 2 / 3 / 5 (alpha = beta = 1, 60 features, 10 classes); concept
shift (W_k), feature shift (beta, v_k) and the label skew they cause remain.

Nothing is generated up front: device k's examples come from a numpy Generator seeded with
(seed, 2, k), so `client_data(k)` returns the same arrays every time and a population of 10^6
devices costs nothing until asked. Example counts are log-normal, drawn for all devices at once
from (seed, 1): n_k = clip(round(size_median * exp(size_sigma * z_k)), min_size, max_size),
z_k ~ N(0, 1). Defaults (median 5, sigma 1.5) give half the devices at most 5 examples and
the largest of 10^6 devices several thousand. The test set is `test_size` examples from
`test_devices` held-out devices seeded with (seed, 3, j), which never train, whatever the
population size.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from asyncfl.data.federated import FederatedDataset
from asyncfl.data.streams import chunked


class SyntheticFederated:
    """Same reading interface as FederatedDataset: num_clients, num_features, num_classes,
    client_sizes(), client_data(k), x_test, y_test; `materialize()` builds a FederatedDataset."""

    def __init__(
        self,
        num_clients: int,
        alpha: float = 1.0,
        beta: float = 1.0,
        seed: int = 0,
        *,
        num_features: int = 60,
        num_classes: int = 10,
        size_median: float = 5.0,
        size_sigma: float = 1.5,
        min_size: int = 1,
        max_size: int = 10_000,
        test_size: int = 10_000,
        test_devices: int = 100,
        cache_size: int = 0,
        common_model: float = 0.0,
    ):
        if num_clients < 1 or num_features < 1 or num_classes < 2:
            raise ValueError(
                f"synthetic: need num_clients >= 1, num_features >= 1, num_classes >= 2; got "
                f"{num_clients}, {num_features}, {num_classes}"
            )
        if alpha < 0 or beta < 0 or seed < 0:
            raise ValueError(f"synthetic: alpha, beta and seed must be >= 0; got {alpha}, {beta}, {seed}")
        if not 1 <= min_size <= max_size or size_median <= 0 or size_sigma < 0:
            raise ValueError(
                f"synthetic: need 1 <= min_size <= max_size, size_median > 0, size_sigma >= 0; got "
                f"min_size={min_size}, max_size={max_size}, size_median={size_median}, "
                f"size_sigma={size_sigma}"
            )
        if not common_model >= 0:
            raise ValueError(f"synthetic: common_model must be >= 0, got {common_model}")
        if test_devices < 1 or test_size < test_devices or cache_size < 0:
            raise ValueError(
                f"synthetic: need test_size >= test_devices >= 1 and cache_size >= 0; got "
                f"test_size={test_size}, test_devices={test_devices}, cache_size={cache_size}"
            )
        self.num_clients, self.alpha, self.beta, self.seed = int(num_clients), float(alpha), float(beta), int(seed)
        self.num_classes, self._features = int(num_classes), int(num_features)
        self.size_median, self.size_sigma = float(size_median), float(size_sigma)
        self.min_size, self.max_size = int(min_size), int(max_size)
        self.test_size, self.test_devices, self.cache_size = int(test_size), int(test_devices), int(cache_size)
        self._std = np.arange(1, num_features + 1, dtype=np.float64) ** -0.6  # sqrt(j^-1.2)
        self.common_model = float(common_model)
        g = np.random.default_rng([self.seed, 4])
        self._common_w = g.normal(0.0, 1.0, (self.num_classes, self._features))
        self._common_b = g.normal(0.0, 1.0, self.num_classes)
        self._sizes: np.ndarray | None = None
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def num_features(self) -> int:
        return self._features

    def client_sizes(self) -> np.ndarray:
        """Examples per device (int64, read-only), computed once for the whole population."""
        if self._sizes is None:
            rng = np.random.default_rng([self.seed, 1])

            def draw(k: int) -> np.ndarray:
                sizes = np.rint(self.size_median * np.exp(self.size_sigma * rng.standard_normal(k)))
                return np.clip(sizes, self.min_size, self.max_size)

            self._sizes = chunked(self.num_clients, draw, np.int64)
            self._sizes.flags.writeable = False
        return self._sizes

    def _generate(self, key: list[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        # u, B, W, b, v and the examples' noise, in this order, as one standard-normal block:
        # N(loc, scale) is loc + scale * (the next standard normal), so one generator call
        # gives the same values as six
        c, f = self.num_classes, self._features
        z = np.random.default_rng([self.seed, *key]).standard_normal(2 + c * f + c + f + n * f)
        u = np.sqrt(self.alpha) * z[0]
        big_b = np.sqrt(self.beta) * z[1]
        o = 2
        w = z[o : o + c * f].reshape(c, f) + u
        o += c * f
        b = z[o : o + c] + u
        o += c
        v = z[o : o + f] + big_b
        o += f
        x = v + z[o:].reshape(n, f) * self._std
        if self.common_model:
            w = w + self.common_model * self._common_w
            b = b + self.common_model * self._common_b
        y = np.argmax(x @ w.T + b, axis=1)
        return x.astype(np.float32), y.astype(np.int64)

    def common_model_accuracy(self) -> float:
        """Share of the test set that the shared model alone labels right: what a global model
        can hope for on unseen devices (logistic regression trained centrally on 10^4 devices
        comes within 0.01-0.04 of it)."""
        x, y = self.x_test.numpy().astype(np.float64), self.y_test.numpy()
        return float((np.argmax(x @ self._common_w.T + self._common_b, axis=1) == y).mean())

    def client_data(self, client: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x float32 [n_k, features], y int64 [n_k]) of device `client`, regenerated from (seed, client)."""
        k = int(client)
        if not 0 <= k < self.num_clients:
            raise IndexError(f"synthetic: client {client} out of range 0..{self.num_clients - 1}")
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        x, y = self._generate([2, k], int(self.client_sizes()[k]))
        out = torch.from_numpy(x), torch.from_numpy(y)
        if self.cache_size:
            self._cache[k] = out
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return out

    def _test_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._test is None:
            per = np.full(self.test_devices, self.test_size // self.test_devices)
            per[: self.test_size % self.test_devices] += 1
            parts = [self._generate([3, j], int(n)) for j, n in enumerate(per)]
            self._test = (
                torch.from_numpy(np.concatenate([p[0] for p in parts])),
                torch.from_numpy(np.concatenate([p[1] for p in parts])),
            )
        return self._test

    @property
    def x_test(self) -> torch.Tensor:
        return self._test_set()[0]

    @property
    def y_test(self) -> torch.Tensor:
        return self._test_set()[1]

    def materialize(self, num_clients: int | None = None) -> FederatedDataset:
        """The first `num_clients` devices (default all) stored as an ordinary FederatedDataset."""
        m = self.num_clients if num_clients is None else int(num_clients)
        if not 1 <= m <= self.num_clients:
            raise ValueError(f"synthetic: materialize needs 1..{self.num_clients} clients, got {num_clients}")
        parts = [self.client_data(k) for k in range(m)]
        sizes = np.array([len(p[1]) for p in parts])
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return FederatedDataset(
            torch.cat([p[0] for p in parts]),
            torch.cat([p[1] for p in parts]),
            [np.arange(offsets[k], offsets[k + 1]) for k in range(m)],
            self.x_test,
            self.y_test,
            self.num_classes,
        )
