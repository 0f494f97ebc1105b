"""Safe by default: with no setting changed, no single upload can damage the model. The norm
guard refuses outsized updates, a step that would make the model non-finite is refused, what
a client reports is bounded and required where the algorithm reads it, and every upload refused
after its lease was checked ends that lease and reopens its slot."""

from __future__ import annotations

import json
import math

import pytest
import torch

from asyncfl import wire
from asyncfl.config import ServerConfig
from tests.test_server_inputs import Harness, assert_rejected

DEFAULTS = {"max_update_norm": None}  # the Harness sets a bound of its own; these tests run without it


def model_state(h):
    """Version, model bytes, verdict counts and buffer fill (not the leases, which a refused
    upload ends)."""
    version, model, updates, _, fill = h.snapshot()
    return version, model, updates, fill


def slots(h):
    s = h.http.get("/status").json()["leases"]
    return s["active"], s["open_slots"]


def honest(h, n):
    return torch.randn(h.server.model.numel, generator=torch.Generator().manual_seed(n)) * 0.01


# ---- defaults --------------------------------------------------------------------------------


def test_defaults_guard_and_bound_reports():
    s = ServerConfig()
    assert s.norm_guard is not None and s.norm_guard.multiple == 5 and s.max_examples is None
    assert s.max_loss == 1e4


@pytest.mark.parametrize("value", [1e30, 3e38])
def test_one_huge_fedbuff_update_is_rejected_and_changes_nothing(tmp_path, value):
    with Harness(tmp_path, **DEFAULTS) as h:
        lease = h.checkin("a")
        before = model_state(h)
        r = h.upload("a", h.frame(lease, torch.full((h.server.model.numel,), value)))
        assert_rejected(h, r, 422, "norm_rejected", "absolute bound")
        assert model_state(h) == before
        assert slots(h) == (0, 4)  # the lease ended, its slot reopened
        s = h.http.get("/status").json()
        assert s["norm_guard"]["rejected"] == 1 and s["rejected"]["norm_rejected"] == 1
        row = h.server.store.query("SELECT verdict, status FROM updates")
        assert row == [("rejected", 422)]
        # honest updates go on
        for c in "bcd":
            assert h.upload(c, h.frame(h.checkin(c), honest(h, ord(c)))).status_code == 200
        assert h.http.get("/status").json()["version"] == 1


def test_guard_adapts_after_warmup_and_survives_a_restart(tmp_path):
    with Harness(tmp_path, algorithm={"name": "fedbuff", "buffer_size": 2}, norm_guard={"warmup": 2}) as h:
        for i, c in enumerate("abcd"):
            assert h.upload(c, h.frame(h.checkin(c), honest(h, i))).status_code == 200
        norm = float(honest(h, 0).norm())
        bound = h.http.get("/status").json()["norm_guard"]["bound"]
        assert bound == pytest.approx(5 * norm, rel=0.2)
        h.close()
        h.open()
        assert h.http.get("/status").json()["norm_guard"]["bound"] == bound
        before = model_state(h)
        r = h.upload("e", h.frame(h.checkin("e"), honest(h, 9) * 60))
        assert_rejected(h, r, 422, "norm_rejected", "median of the last 4")
        assert model_state(h) == before


# ---- a step that would make the model non-finite ---------------------------------------------


def test_updates_that_overflow_when_summed_leave_the_model_finite(tmp_path):
    """Guard off, no norm bound: each 3e38 update is finite, their sum is not."""
    algorithm = {"name": "fedbuff", "buffer_size": 2, "server_opt": {"name": "sgd", "lr": 1.0, "momentum": 0.9}}
    with Harness(tmp_path, algorithm=algorithm, norm_guard=None, **DEFAULTS) as h:
        for c in "ab":  # one honest step first: the momentum buffer exists
            assert h.upload(c, h.frame(h.checkin(c), honest(h, ord(c)))).status_code == 200
        agg = h.server.aggregation
        w1, m1 = agg.state.w.clone(), agg.aggregator.server_opt.m.clone()
        before = model_state(h)
        huge = torch.full((h.server.model.numel,), 3e38)
        first = h.upload("c", h.frame(h.checkin("c"), huge))
        assert first.status_code == 200 and first.json()["verdict"] == "buffered"
        r = h.upload("d", h.frame(h.checkin("d"), huge))
        assert_rejected(h, r, 422, "step_not_finite", "model is unchanged")
        assert torch.equal(agg.state.w, w1) and torch.equal(agg.aggregator.server_opt.m, m1)
        version, model, updates, fill = model_state(h)
        assert (version, model, fill) == (before[0], before[1], 0)
        assert updates["discarded"] == 1 and updates["buffered"] == before[2]["buffered"]
        assert slots(h) == (0, 4)
        for c in "ef":  # later honest updates are accepted and step from the same model
            assert h.upload(c, h.frame(h.checkin(c), honest(h, ord(c)))).status_code == 200
        assert h.http.get("/status").json()["version"] == 2 and bool(torch.isfinite(agg.state.w).all())
        counts = dict(agg.counts)
        h.close()
        h.open()  # the discarded update is discarded in the log too
        assert h.server.aggregation.counts == counts
        verdicts = dict(h.server.store.query("SELECT seq, verdict FROM updates"))
        assert verdicts[3] == "discarded" and verdicts[4] == "rejected"


def test_refused_round_step_keeps_the_model_and_the_round_goes_on(tmp_path):
    with Harness(tmp_path, {"name": "fedavg"}, {"mode": "sync", "concurrency": 2}, norm_guard=None, **DEFAULTS) as h:
        w0 = h.server.aggregation.state.w.clone()
        huge = torch.full((h.server.model.numel,), 3e38)
        for c in "ab":
            assert h.upload(c, h.frame(h.checkin(c), huge)).status_code == 200
        s = h.http.get("/status").json()
        assert s["version"] == 0 and s["round"]["number"] == 2 and s["updates"]["discarded"] == 2
        assert torch.equal(h.server.aggregation.state.w, w0)
        for c in "cd":
            assert h.upload(c, h.frame(h.checkin(c), honest(h, ord(c)))).status_code == 200
        assert h.http.get("/status").json()["version"] == 1


# ---- what a client reports --------------------------------------------------------------------


def test_fedavg_example_count_cannot_take_the_weight(tmp_path):
    with Harness(tmp_path, {"name": "fedavg"}, {"mode": "sync", "concurrency": 2}, **DEFAULTS) as h:
        largest = int(h.server.data.client_sizes().max())
        a, b = h.checkin("a"), h.checkin("b")
        before = model_state(h)
        r = h.upload("a", h.frame(a, honest(h, 1), n_examples=10**9))
        assert_rejected(h, r, 422, "n_examples_too_large", f"exceeds {largest}")
        assert model_state(h) == before
        assert h.upload("b", h.frame(b, honest(h, 2), n_examples=14)).status_code == 200
        assert h.upload("c", h.frame(h.checkin("c"), honest(h, 3), n_examples=largest)).status_code == 200


def test_max_examples_setting_and_steps_bound(tmp_path):
    with Harness(tmp_path, max_examples=30, **DEFAULTS) as h:  # trainer: local_steps 2
        r = h.upload("a", h.frame(h.checkin("a"), n_examples=31))
        assert_rejected(h, r, 422, "n_examples_too_large", "exceeds 30")
        r = h.upload("b", h.frame(h.checkin("b"), steps=21))
        assert_rejected(h, r, 422, "bad_steps", "exceeds 20 (10 x")
        r = h.upload("c", h.frame(h.checkin("c"), steps=3, planned_steps=2))
        assert_rejected(h, r, 422, "bad_steps", "exceeds planned_steps 2")
        r = h.upload("d", h.frame(h.checkin("d"), loss=-1.0))
        assert_rejected(h, r, 422, "bad_loss", "outside [0, 10000]")
        assert h.upload("e", h.frame(h.checkin("e"), n_examples=30, steps=20)).status_code == 200


def test_qfedavg_without_start_loss_is_422_and_its_slot_reopens(tmp_path):
    with Harness(tmp_path, {"name": "qfedavg", "buffer_size": 2}, {"mode": "async", "concurrency": 2}) as h:
        lease = h.checkin("a")
        before = model_state(h)
        r = h.upload("a", h.frame(lease))
        assert_rejected(h, r, 422, "missing_start_loss", "qfedavg needs start_loss")
        assert model_state(h) == before and slots(h) == (0, 2)
        again = h.upload("a", h.frame(lease, key=h.server.store.query("SELECT idem_key FROM updates")[0][0]))
        assert again.status_code == 422 and again.json()["replayed"]  # a re-send gets the same answer
        r = h.upload("b", h.frame(h.checkin("b"), start_loss=1e38))
        assert_rejected(h, r, 422, "bad_loss", "start_loss 1e+38 is outside")
        for c in "cd":  # the largest start_loss accepted keeps the model finite
            assert h.upload(c, h.frame(h.checkin(c), honest(h, ord(c)), start_loss=1e4)).status_code == 200
        s = h.http.get("/status").json()
        assert s["version"] == 1 and bool(torch.isfinite(h.server.aggregation.state.w).all())


def test_fednova_without_local_steps_is_422_about_steps(tmp_path):
    with Harness(tmp_path, {"name": "fednova", "buffer_size": 2}, {"mode": "async", "concurrency": 2}) as h:
        r = h.upload("a", h.frame(h.checkin("a"), steps=0))
        assert_rejected(h, r, 422, "bad_steps", "fednova needs at least one local step")
        assert slots(h) == (0, 2)


# ---- every failure releases its lease and slot --------------------------------------------------


def failing_uploads(h):
    """One upload per way of failing after the lease check, each on its own lease."""
    numel = h.server.model.numel
    return [
        ("missing_start_loss", {}),
        ("n_examples_too_large", {"n_examples": 10**9, "start_loss": 1.0}),
        ("norm_rejected", {"delta": torch.full((numel,), 1e30), "start_loss": 1.0}),
        ("bad_loss", {"start_loss": 1e38}),
        ("bad_loss", {"loss": 1e30, "start_loss": 1.0}),
        ("bad_steps", {"steps": 10**6, "start_loss": 1.0}),
        ("bad_steps", {"steps": 3, "planned_steps": 1, "start_loss": 1.0}),
    ]


def test_uploads_failing_every_way_leave_every_slot_open(tmp_path):
    c = 8
    with Harness(tmp_path, {"name": "qfedavg", "buffer_size": 2}, {"mode": "async", "concurrency": c}, **DEFAULTS) as h:
        clients = [f"u{i}" for i in range(c)]
        h.tokens |= {name: h.mint(name, "task1") for name in clients + [f"n{i}" for i in range(c)]}
        leases = [h.checkin(name) for name in clients]
        assert slots(h) == (c, 0)
        before = model_state(h)

        def broken(*args, **kwargs):
            raise RuntimeError("a bug in the aggregator")

        h.server.aggregation.aggregator.submit = broken
        expected = [*failing_uploads(h), ("internal", {"start_loss": 1.0})]
        assert len(expected) == c
        for name, lease, (code, header) in zip(clients, leases, expected):
            r = h.upload(name, h.frame(lease, **header))
            assert r.status_code == (500 if code == "internal" else 422) and r.json()["error"] == code, r.text
        assert model_state(h) == before and slots(h) == (0, c)
        del h.server.aggregation.aggregator.submit
        fresh = [h.checkin(f"n{i}") for i in range(c)]
        assert all(lease["action"] == "train" for lease in fresh) and slots(h) == (c, 0)


def test_refused_step_and_fednova_steps_release_in_sync_rounds(tmp_path):
    algorithm = {"name": "fednova"}
    with Harness(tmp_path, algorithm, {"mode": "sync", "concurrency": 2}, norm_guard=None, **DEFAULTS) as h:
        a, b = h.checkin("a"), h.checkin("b")
        assert_rejected(h, h.upload("a", h.frame(a, steps=0)), 422, "bad_steps", "at least one local step")
        assert_rejected(h, h.upload("b", h.frame(b, n_examples=10**9)), 422, "n_examples_too_large", "exceeds")
        s = h.http.get("/status").json()  # nobody left in flight: the round closed, the next one opened
        assert s["round"]["number"] == 2 and s["leases"]["open_slots"] == 2 and s["version"] == 0


def test_frame_errors_found_before_the_lease_keep_it_usable(tmp_path):
    """A NaN loss or delta is refused while the frame is parsed, before the lease is known to be
    live: the lease stays the client's, for a good upload or to expire."""
    with Harness(tmp_path, **DEFAULTS) as h:
        lease = h.checkin("a")
        good = h.frame(lease)
        hlen = int.from_bytes(good[4:8], "little")
        raw = json.dumps(json.loads(good[8 : 8 + hlen]) | {"loss": math.nan}).encode()  # NaN, as JSON allows
        r = h.upload("a", wire.MAGIC + len(raw).to_bytes(4, "little") + raw + good[8 + hlen :])
        assert r.status_code == 400 and r.json()["error"] == "malformed"
        assert slots(h) == (1, 3)
        assert h.upload("a", h.frame(lease)).status_code == 200 and slots(h) == (0, 4)


def test_kardam_filter_refusal_is_422_and_keeps_the_model(tmp_path):
    kardam = {"kind": "kardam", "byzantine_fraction": 0.25, "window": 4, "warmup": 1}
    algorithm = {"name": "fedbuff", "buffer_size": 1, "filter": kardam}
    with Harness(tmp_path, algorithm=algorithm, norm_guard=None, **DEFAULTS) as h:
        for i, c in enumerate("aba"):  # every upload steps; a's second one gives the first coefficient
            assert h.upload(c, h.frame(h.checkin(c), honest(h, i))).status_code == 200
        before = model_state(h)
        r = h.upload("b", h.frame(h.checkin("b"), honest(h, 3) * -1000))
        assert_rejected(h, r, 422, "filter_rejected", "Lipschitz coefficient")
        assert model_state(h) == before
        assert slots(h) == (0, 4)
        s = h.http.get("/status").json()
        assert s["filter"]["rejected"] == 1 and s["filter"]["accepted"] == 3 and s["rejected"]["filter_rejected"] == 1
        h.close()
        h.open()  # the filter's window survives a restart
        assert h.server.aggregation.aggregator.rejected == 1 and len(h.server.aggregation.aggregator.coefficients) == 2


def test_a_refused_upload_counts_towards_the_sync_cohort(tmp_path):
    """As in the simulator: the round closes at `cohort` reports, refused ones included, and
    does not wait for the over-selected straggler."""
    sched = {"mode": "sync", "concurrency": 2, "over_selection": 0.5}  # 3 selected, 2 reports close it
    with Harness(tmp_path, {"name": "fedavg"}, sched, **DEFAULTS) as h:
        leases = {c: h.checkin(c) for c in "abc"}
        assert h.upload("a", h.frame(leases["a"], honest(h, 1))).status_code == 200
        r = h.upload("b", h.frame(leases["b"], honest(h, 2) * 1e6))
        assert_rejected(h, r, 422, "norm_rejected", "exceeds")
        s = h.http.get("/status").json()
        assert s["version"] == 1 and s["round"]["number"] == 2
        late = h.upload("c", h.frame(leases["c"], honest(h, 3)))
        assert late.status_code == 409 and late.json()["error"] == "lease_cancelled"
