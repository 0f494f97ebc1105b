"""What aggregators show on /status: buffer fill and size, and one privacy report that follows
every noisy step (its epsilon is cached between steps)."""

import pytest
import torch

from asyncfl import privacy
from asyncfl.algorithms.aggregators import FedAsync, fedbuff
from asyncfl.algorithms.private import DPMechanism, PrivateAggregator
from asyncfl.algorithms.server_opt import SGD
from asyncfl.algorithms.types import ClientUpdate, ServerState


def update(client):
    return ClientUpdate(client_id=client, base_version=0, delta=torch.ones(4), n_examples=10, steps=5, loss=1.0)


def test_buffer_fill_and_size():
    state = ServerState(torch.zeros(4))
    agg = fedbuff(SGD(1.0), buffer_size=3, staleness=lambda d: 1.0)
    agg.submit(state, update(0), state.w)
    assert agg.status() == {"buffer": {"fill": 1, "size": 3}, "privacy": None}
    assert FedAsync(0.5, lambda d: 1.0).status() == {"buffer": {"fill": 0, "size": None}, "privacy": None}


def test_private_status_is_the_privacy_report_and_epsilon_follows_each_step():
    mechanism = DPMechanism(clip_norm=1.0, noise_multiplier=1.1, denominator=2, sample_rate=0.1)
    agg = PrivateAggregator(SGD(1.0), lambda u, d: 1.0, mechanism, buffer_size=2)
    state = ServerState(torch.zeros(4))
    seen = []
    for i in range(6):
        agg.submit(state, update(i), state.w)
        seen.append(agg.status()["privacy"]["epsilon"])
    assert agg.status()["privacy"] == agg.privacy_report()
    assert agg.status()["buffer"] == {"fill": 0, "size": 2}
    want = [0.0] + [privacy.epsilon(1.1, 0.1, s, 1e-5) for s in (1, 2, 3)]
    assert seen == pytest.approx([want[0], want[1], want[1], want[2], want[2], want[3]], rel=1e-12)
    assert agg.epsilon(1e-3) == pytest.approx(privacy.epsilon(1.1, 0.1, 3, 1e-3))  # another delta: not the cache
