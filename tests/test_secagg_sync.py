"""Synchronous SecAgg / SecAgg+: correct sums, dropout recovery up to n - t, clean failures beyond."""

import dataclasses
import json

import numpy as np
import pytest

from asyncfl.secagg import FixedPointCodec, ProtocolViolation, SecAggAbort, SecAggClient, SecAggServer
from asyncfl.secagg.graph import neighbour_graph
from asyncfl.secagg.messages import from_json, to_json
from asyncfl.secagg.secagg_round import PHASES, make_params, run_round

LENGTH = 300
CODEC = FixedPointCodec(clip_range=1.0, max_total_weight=200)


def _updates(clients, seed=0):
    rng = np.random.default_rng(seed)
    updates = {c: rng.normal(0, 0.6, LENGTH) for c in range(clients)}
    weights = {c: int(rng.integers(1, 9)) for c in range(clients)}
    return updates, weights


def _check_sum(result, updates, weights):
    plaintext = sum(weights[c] * np.clip(updates[c], -1.0, 1.0) for c in result.survivors)
    assert result.total_weight == sum(weights[c] for c in result.survivors)
    assert np.abs(result.weighted_sum - plaintext).max() <= CODEC.error_bound(result.total_weight)


@pytest.mark.parametrize("neighbours", [None, 4])
def test_unmasked_sum_equals_the_plaintext_weighted_sum(neighbours):
    updates, weights = _updates(9)
    params = make_params(9, 4, neighbours, LENGTH)
    result = run_round(params, CODEC, updates, weights, np.random.default_rng(1))
    assert result.survivors == tuple(range(9))
    _check_sum(result, updates, weights)
    assert result.upload_bytes["masked_input"] == 9 * (LENGTH * 4 + 8)


@pytest.mark.parametrize("phase", PHASES)
def test_all_pairs_recovers_from_n_minus_t_dropouts_in_each_phase(phase):
    updates, weights = _updates(8, seed=2)
    params = make_params(8, 5, None, LENGTH)
    dropped = {1, 4, 6}
    result = run_round(params, CODEC, updates, weights, np.random.default_rng(3), {phase: dropped})
    # dropping before the masked input removes the update; dropping after uploading it keeps it
    expected = set(range(8)) if phase == "unmask" else set(range(8)) - dropped
    assert set(result.survivors) == expected
    _check_sum(result, updates, weights)


@pytest.mark.parametrize("phase", PHASES)
def test_all_pairs_fails_cleanly_beyond_n_minus_t(phase):
    updates, weights = _updates(8, seed=2)
    params = make_params(8, 5, None, LENGTH)
    with pytest.raises(SecAggAbort) as caught:
        run_round(params, CODEC, updates, weights, np.random.default_rng(3), {phase: {0, 1, 4, 6}})
    assert caught.value.alive == 4 and caught.value.needed == 5
    assert caught.value.phase == phase
    assert "4 left, 5 needed" in str(caught.value)


def test_dropouts_spread_over_all_phases_up_to_n_minus_t():
    updates, weights = _updates(10, seed=4)
    params = make_params(10, 6, None, LENGTH)
    dropouts = {"advertise": {0}, "share_keys": {3}, "masked_input": {5}, "unmask": {8}}
    result = run_round(params, CODEC, updates, weights, np.random.default_rng(5), dropouts)
    assert set(result.survivors) == {1, 2, 4, 6, 7, 8, 9}
    _check_sum(result, updates, weights)


def _spread_dropouts(graph, count, per_neighbourhood):
    """`count` clients such that no closed neighbourhood loses more than `per_neighbourhood`."""
    dropped = []
    for client in sorted(graph):
        if all(len((graph[v] | {v}) & {*dropped, client}) <= per_neighbourhood for v in graph):
            dropped.append(client)
    return dropped[:count]


def test_sparse_graph_recovers_from_dropouts_after_sharing_and_after_uploading():
    updates, weights = _updates(24, seed=6)
    params = make_params(24, 4, 6, LENGTH, round_id=b"fixed round id 1")
    graph = neighbour_graph(24, 6, params.round_id)
    gone = _spread_dropouts(graph, 6, per_neighbourhood=6 + 1 - 4)  # k + 1 - t per neighbourhood
    assert len(gone) == 6
    dropouts = {"share_keys": gone[:1], "masked_input": gone[1:4], "unmask": gone[4:]}
    result = run_round(params, CODEC, updates, weights, np.random.default_rng(7), dropouts)
    assert set(result.survivors) == set(range(24)) - set(gone[:4])
    _check_sum(result, updates, weights)
    everyone = run_round(make_params(24, 4, None, LENGTH), CODEC, updates, weights, np.random.default_rng(7))
    assert sum(result.upload_bytes.values()) < sum(everyone.upload_bytes.values()) / 2


def test_sparse_graph_fails_cleanly_when_a_neighbourhood_falls_below_t():
    updates, weights = _updates(16, seed=8)
    params = make_params(16, 4, 4, LENGTH, round_id=b"fixed round id 2")
    victim_neighbours = neighbour_graph(16, 4, params.round_id)[0]
    dropouts = {"unmask": set(sorted(victim_neighbours)[:2])}  # 0 and 2 of its 4 neighbours: 3 < t holders
    with pytest.raises(SecAggAbort, match="unmask") as caught:
        run_round(params, CODEC, updates, weights, np.random.default_rng(9), dropouts)
    assert caught.value.needed == 4 and caught.value.alive < 4


def test_neighbour_graph_is_k_regular_symmetric_and_public():
    graph = neighbour_graph(30, 6, b"round")
    assert all(len(peers) == 6 and client not in peers for client, peers in graph.items())
    assert all(client in graph[peer] for client, peers in graph.items() for peer in peers)
    assert graph == neighbour_graph(30, 6, b"round") != neighbour_graph(30, 6, b"other")
    assert neighbour_graph(5, 4, b"r")[0] == {1, 2, 3, 4}
    with pytest.raises(ValueError, match="even degree"):
        neighbour_graph(30, 5, b"round")


def _round_up_to_unmask(clients=5, threshold=3, dropped_before_upload=(4,)):
    params = make_params(clients, threshold, None, 8)
    server = SecAggServer(params)
    members = {c: SecAggClient(params, c) for c in range(clients)}
    directories = server.collect_keys(m.advertise() for m in members.values())
    incoming = server.route_shares(members[c].share_keys(directories[c]) for c in members)
    encoded = CODEC.ring.zeros(8)
    alive = [c for c in members if c not in dropped_before_upload]
    requests = server.collect_masked(members[c].masked_input(incoming[c], encoded, 1) for c in alive)
    return members, requests


def test_a_client_never_reveals_both_shares_of_one_peer():
    members, requests = _round_up_to_unmask()
    client = members[0]
    assert requests[0].dropped == (4,)
    response = client.unmask(requests[0])
    assert set(response.self_mask_shares) == {0, 1, 2, 3} and set(response.key_shares) == {4}
    with pytest.raises(ProtocolViolation, match="both"):
        client.unmask(type(requests[0])(survivors=(0, 2, 3, 4), dropped=(1,)))  # 4 was revealed as dropped
    with pytest.raises(ProtocolViolation, match="both surviving and dropped"):
        members[1].unmask(type(requests[0])(survivors=(0, 1, 2), dropped=(2,)))


def test_a_client_refuses_to_unmask_a_too_small_set_or_unknown_peers():
    members, _ = _round_up_to_unmask()
    request_type = type(_[0])
    with pytest.raises(SecAggAbort, match="unmask"):
        members[0].unmask(request_type(survivors=(0, 1), dropped=(2, 3, 4)))
    with pytest.raises(ProtocolViolation, match="alive"):
        members[1].unmask(request_type(survivors=(0, 2, 3), dropped=(1,)))
    with pytest.raises(ProtocolViolation, match="phase"):
        members[2].advertise()


def test_the_server_refuses_duplicate_or_out_of_turn_messages():
    params = make_params(4, 3, None, 8)
    server = SecAggServer(params)
    clients = [SecAggClient(params, c) for c in range(4)]
    adverts = [c.advertise() for c in clients]
    with pytest.raises(ProtocolViolation, match="two messages"):
        server.collect_keys(adverts + adverts[:1])
    with pytest.raises(ProtocolViolation, match="malformed"):
        SecAggServer(params).collect_keys([dataclasses.replace(adverts[0], mask_key=b"short"), *adverts[1:]])
    server = SecAggServer(params)  # a failed phase ends the round
    directories = server.collect_keys(adverts)
    incoming = server.route_shares(c.share_keys(directories[c.client]) for c in clients)
    inputs = [c.masked_input(incoming[c.client], CODEC.ring.zeros(8), 1) for c in clients]
    short = dataclasses.replace(inputs[0], masked=inputs[0].masked[:-4])
    with pytest.raises(ProtocolViolation, match="wrong size"):
        server.collect_masked([short, *inputs[1:]])
    with pytest.raises(ValueError, match="threshold"):
        SecAggServer(make_params(10, 6, 4, 8))


def test_a_round_whose_every_message_travels_as_json():
    def wire(message):
        return from_json(type(message), json.loads(json.dumps(to_json(message))))

    params = wire(make_params(4, 3, None, LENGTH))
    updates, weights = _updates(4, seed=10)
    server, rng = SecAggServer(params), np.random.default_rng(11)
    clients = {c: SecAggClient(params, c) for c in range(4)}
    directories = server.collect_keys(wire(c.advertise()) for c in clients.values())
    incoming = server.route_shares(wire(clients[c].share_keys(wire(directories[c]))) for c in clients)
    inputs = [
        wire(clients[c].masked_input(wire(incoming[c]), CODEC.encode(updates[c], rng), weights[c])) for c in (0, 1, 2)
    ]
    requests = server.collect_masked(inputs)
    result = server.unmask(wire(clients[c].unmask(wire(requests[c]))) for c in requests)
    plaintext = sum(weights[c] * np.clip(updates[c], -1.0, 1.0) for c in (0, 1, 2))
    decoded = CODEC.decode(result.total, result.total_weight)
    assert np.abs(decoded - plaintext).max() <= CODEC.error_bound(result.total_weight)
