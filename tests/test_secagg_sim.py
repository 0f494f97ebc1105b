"""The simulator's secure-aggregation cost model: bytes as the protocols send them, the client's
encoding, and sync rounds lost to too few survivors."""

import numpy as np
import torch

from asyncfl import config
from asyncfl.config import SecureAggregationConfig
from asyncfl.experiment import build_simulation
from asyncfl.secagg import FixedPointCodec, Ring, make_params, mask_for_tsa, run_round
from asyncfl.secagg.crypto import KeyPair
from asyncfl.secagg.messages import wire_bytes
from asyncfl.sim.secure_aggregation import ClientEncoding, neighbours, sync_cost, sync_threshold, tsa_cost


def test_sync_bytes_match_a_round_at_full_length():
    s = SecureAggregationConfig(protocol="secagg_plus", clip_range=1.0, neighbours=4, bits=16)
    clients, length = 9, 300
    cost = sync_cost(s, clients, length)
    params = make_params(clients, sync_threshold(s, clients), 4, length, 16)
    rng = np.random.default_rng(1)
    updates = {c: rng.uniform(-1, 1, length) for c in range(clients)}
    result = run_round(params, FixedPointCodec(1.0, clients, Ring(16)), updates, dict.fromkeys(updates, 1), rng)
    assert cost.upload_bytes == -(-sum(result.upload_bytes.values()) // clients)
    assert cost.extra_download_bytes == -(-sum(result.download_bytes.values()) // clients)
    # the masked vector is 2 bytes per coordinate; the other phases add the keys, shares and unmasking
    assert cost.upload_bytes > 2 * length and cost.threshold == 3  # ceil(0.5 x (4 + 1))


def test_all_pairs_secagg_costs_more_than_secagg_plus():
    plus = SecureAggregationConfig(protocol="secagg_plus", clip_range=1.0)
    pairs = SecureAggregationConfig(protocol="secagg", clip_range=1.0)
    assert neighbours(plus, 26) == 10 and neighbours(pairs, 26) == 25
    assert sync_threshold(pairs, 26) == 13
    a, b = sync_cost(plus, 26, 1000), sync_cost(pairs, 26, 1000)
    assert b.upload_bytes > a.upload_bytes and b.client_seconds > a.client_seconds


def test_tsa_upload_is_the_masked_vector_and_sealed_seed():
    s = SecureAggregationConfig(protocol="tsa", clip_range=1.0)
    length = 500
    cost = tsa_cost(s, 10, length)
    ring = Ring(32)
    upload = mask_for_tsa(ring.zeros(length), ring, KeyPair().public_bytes(), "task", "update-0000000000")
    assert cost.upload_bytes == wire_bytes(upload)
    assert 4 * length + 60 < cost.upload_bytes < 4 * length + 200  # the seed sealed to the TSA is ~100 bytes
    assert cost.tsa_step_bytes > 4 * length + 10 * 60  # the response's mask sum and K contributions


def test_client_encoding_clips_and_rounds_within_the_bound():
    s = SecureAggregationConfig(protocol="secagg", clip_range=0.5, bits=16)
    encoding = ClientEncoding(s, 100)
    delta = torch.tensor([2.0, -3.0, 0.1234, -0.25], dtype=torch.float32)
    out = encoding(delta, seed=7)
    step = 1 / encoding.codec.scale
    assert out[0] == 0.5 and out[1] == -0.5
    assert abs(float(out[2]) - 0.1234) < step and abs(float(out[3]) + 0.25) < step
    exact = ClientEncoding(s.model_copy(update={"rounding": False}), 100)(delta, seed=7)
    assert exact.tolist() == [0.5, -0.5, float(delta[2]), -0.25]


def quick_tree(run: dict) -> dict:
    tree = config.preset_dict("quickstart")
    tree["executor"] = "sequential"
    tree["stop"] = {"max_time": 150}
    tree["population"]["dropout"] = 0.3
    tree["runs"] = [dict(run, name="r")]
    return tree


SYNC = {"algorithm": {"name": "fedavg"}, "scheduler": {"mode": "sync", "concurrency": 10}}


def simulate(tree):
    cfg = config.validate(tree)
    return build_simulation(cfg, cfg.runs[0]).run()


def test_sync_round_with_too_few_survivors_fails_and_is_counted():
    plain = simulate(quick_tree(SYNC))
    strict = simulate(
        quick_tree(dict(SYNC, secure_aggregation={"protocol": "secagg", "clip_range": 1.0, "threshold": 1.0}))
    )
    # t = all 10 selected: with 30 % dropout almost every round loses a client and cannot unmask
    assert strict.extra["secagg_threshold"] == 10
    assert strict.extra["secagg_failed_rounds"] > 0
    assert strict.server_steps < plain.server_steps
    assert strict.bytes_up > 0 and strict.extra["upload_payload_bytes"] > plain.extra["upload_payload_bytes"]


def test_tsa_run_counts_requests_and_charges_masked_uploads():
    fedbuff = {"algorithm": {"name": "fedbuff", "buffer_size": 5}, "scheduler": {"mode": "async", "concurrency": 10}}
    m = simulate(quick_tree(dict(fedbuff, secure_aggregation={"protocol": "tsa", "clip_range": 1.0})))
    assert m.extra["tsa_requests"] == m.server_steps > 0
    assert m.bytes_up == m.completed * m.extra["upload_payload_bytes"]
