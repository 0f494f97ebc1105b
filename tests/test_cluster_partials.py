"""Partial sums: what a selector writes is what the single process's aggregator would have summed."""

import math

import pytest
import torch

from asyncfl.algorithms.aggregators import BufferedAggregator, FedAsync, fedbuff
from asyncfl.algorithms.server_opt import SGD
from asyncfl.algorithms.staleness import constant, polynomial
from asyncfl.algorithms.types import ClientUpdate, ServerState
from asyncfl.cluster.partials import Partial, decode_partial, empty, encode_partial, merges


def _update(base: int, n: int, delta: list[float], **kw) -> ClientUpdate:
    return ClientUpdate(
        client_id=7, base_version=base, delta=torch.tensor(delta), n_examples=n, steps=3, loss=0.5, **kw
    )


def _fedbuff(**kw) -> BufferedAggregator:
    return fedbuff(SGD(lr=1.0), 10, polynomial(0.5), **kw)


def test_merges_only_the_linear_fold():
    assert merges(_fedbuff())
    assert not merges(FedAsync(0.5, constant()))
    assert not merges(_fedbuff(aggregation="median"))


def test_sum_equals_hand_computed_and_the_buffer_it_replaces():
    agg = _fedbuff(example_weight="n", clip_norm=5.0)
    updates = [(_update(3, 4, [1.0, 2.0]), 0), (_update(1, 9, [0.0, 10.0]), 2)]
    p = empty()
    for u, s in updates:
        p.add(agg, u, s)
    a0, a1 = 4 * (1 + 0) ** -0.5, 9 * (1 + 2) ** -0.5  # s(d) e(n), polynomial staleness
    assert p.count == 2 and p.weight_sum == pytest.approx(a0 + a1)
    expected = a0 * torch.tensor([1.0, 2.0]) + a1 * torch.tensor([0.0, 5.0])  # the second clipped to norm 5
    assert torch.allclose(p.total, expected)
    ref = _fedbuff(example_weight="n", clip_norm=5.0)
    for u, s in updates:
        ref.submit(ServerState(w=torch.zeros(2), version=u.base_version + s), u, torch.zeros(2))
    back = decode_partial(encode_partial(p))
    folded = _fedbuff(example_weight="n", clip_norm=5.0)
    back.fold_into(folded)
    assert (folded.count, folded.weight_sum) == (ref.count, pytest.approx(ref.weight_sum))
    assert torch.allclose(folded.total, ref.total)


def test_single_update_round_trip():
    u = _update(5, 12, [0.25, -1.0], planned_steps=4, extras={"c:w": torch.tensor([1.0, 2.0])})
    back = decode_partial(encode_partial(Partial.single(u, 2)))
    assert not back.merged and back.staleness == 2 and back.count == 1
    got = back.update
    assert (got.client_id, got.base_version, got.n_examples, got.steps, got.loss, got.planned_steps) == (
        7,
        5,
        12,
        3,
        0.5,
        4,
    )
    assert math.isnan(got.start_loss)
    assert torch.equal(got.delta, u.delta) and torch.equal(got.extras["c:w"], u.extras["c:w"])


def test_empty_sum_is_not_encoded():
    with pytest.raises(ValueError):
        encode_partial(empty())
