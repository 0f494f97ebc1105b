"""The `secure_aggregation:` section: which runs it fits, and refusals that name the reason."""

import pytest

from asyncfl import config
from asyncfl.config import ConfigError

SECURE = {"protocol": "secagg_plus", "clip_range": 0.5}


def run_tree(run: dict, **section) -> dict:
    tree = config.preset_dict("quickstart")
    tree["runs"] = [dict(run, name="r", secure_aggregation=dict(SECURE, **section))]
    return tree


FEDAVG = {"algorithm": {"name": "fedavg"}, "scheduler": {"mode": "sync", "concurrency": 20}}
FEDBUFF = {"algorithm": {"name": "fedbuff", "buffer_size": 10}, "scheduler": {"mode": "async", "concurrency": 20}}


def rejected(tree) -> str:
    with pytest.raises(ConfigError) as err:
        config.validate(tree)
    return str(err.value)


def test_sync_fedavg_and_async_fedbuff_with_tsa_are_valid():
    cfg = config.validate(run_tree(FEDAVG, neighbours=6, bits=32))
    s = cfg.runs[0].secure_aggregation
    assert (s.protocol, s.bits, s.clip_range, s.threshold, s.neighbours) == ("secagg_plus", 32, 0.5, 0.5, 6)
    tsa = config.validate(run_tree(FEDBUFF, protocol="tsa")).runs[0].secure_aggregation
    assert tsa.protocol == "tsa"


def test_quantized_uploads_compose():
    for codec in ("fp16", "int8", "int4"):
        config.validate(run_tree(dict(FEDAVG, compression={"upload": codec})))


def test_sync_protocol_refused_in_async_mode_and_tsa_outside_fedbuff():
    assert "runs in sync rounds, not async mode" in rejected(run_tree(FEDBUFF))
    assert "'tsa' is for async fedbuff" in rejected(run_tree(FEDAVG, protocol="tsa"))


def test_algorithm_without_the_capability_is_refused():
    qfedavg = {"algorithm": {"name": "qfedavg"}, "scheduler": {"mode": "sync", "concurrency": 20}}
    msg = rejected(run_tree(qfedavg))
    assert "not supported for algorithm 'qfedavg'" in msg and "fedavg" in msg


@pytest.mark.parametrize("rule", ["median", "trimmed_mean"])
def test_robust_rules_refused(rule):
    run = dict(FEDAVG, algorithm={"name": "fedavg", "aggregation": rule})
    assert "needs individual updates, which secure aggregation hides" in rejected(run_tree(run))


def test_top_k_refused():
    run = dict(FEDAVG, compression={"upload": "topk:0.1+int8"})
    msg = rejected(run_tree(run))
    assert "top-k needs individual updates, which secure aggregation hides" in msg


def test_kardam_filter_refused():
    run = dict(FEDBUFF, algorithm={"name": "fedbuff", "buffer_size": 10, "filter": {"kind": "kardam"}})
    assert "filter (Kardam) needs individual updates" in rejected(run_tree(run, protocol="tsa"))


def test_norm_guard_and_server_clip_refused_naming_client_clipping():
    msg = rejected(run_tree(dict(FEDAVG, norm_guard={})))
    assert "norm_guard: the server cannot see" in msg and "clip_range bounds each coordinate" in msg
    msg = rejected(run_tree(dict(FEDAVG, algorithm={"name": "fedavg", "clip_norm": 1.0})))
    assert "clip_norm: the server cannot see" in msg


def test_section_checks():
    assert "neighbours applies to secagg_plus only" in rejected(run_tree(FEDAVG, protocol="secagg", neighbours=4))
    assert "must be below the cohort 20" in rejected(run_tree(FEDAVG, neighbours=20))
    assert "apply to the synchronous protocols" in rejected(run_tree(FEDBUFF, protocol="tsa", threshold=0.6))
    assert "multiple of 8" in rejected(run_tree(FEDAVG, bits=12))
