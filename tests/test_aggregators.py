import pytest
import torch

from asyncfl.algorithms import aggregators, server_opt, staleness
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict


def upd(delta, n=10, base=0, cid=0):
    return ClientUpdate(
        client_id=cid,
        base_version=base,
        delta=torch.tensor(delta, dtype=torch.float64),
        n_examples=n,
        steps=1,
        loss=0.0,
    )


def test_fedasync_mixing_matches_hand_computation():
    agg = aggregators.FedAsync(alpha=0.5, staleness=staleness.hinge(a=1, b=1))
    base = torch.tensor([1.0, 2.0], dtype=torch.float64)
    state = ServerState(w=torch.tensor([3.0, 4.0], dtype=torch.float64), version=3)
    # staleness 3 - 0 = 3 > b=1: s = 1 / (1 * 2 + 1) = 1/3, alpha_t = 1/6
    # x_new = base - delta = [0, 1]; w = 5/6 * [3, 4] + 1/6 * [0, 1] = [2.5, 3.5]
    verdict = agg.submit(state, upd([1.0, 1.0], base=0), base)
    assert verdict == Verdict.STEPPED
    assert state.version == 4
    assert torch.allclose(state.w, torch.tensor([2.5, 3.5], dtype=torch.float64))


def test_fedasync_fresh_update_uses_full_alpha():
    agg = aggregators.FedAsync(alpha=0.6, staleness=staleness.polynomial(0.5))
    state = ServerState(w=torch.zeros(1, dtype=torch.float64), version=0)
    agg.submit(state, upd([-1.0]), torch.zeros(1, dtype=torch.float64))
    assert state.w.item() == pytest.approx(0.6)  # x_new = 1, alpha_t = 0.6 * 1^-0.5


def test_fedbuff_steps_every_k_with_staleness_weights():
    agg = aggregators.fedbuff(server_opt.SGD(lr=1.0), buffer_size=2, staleness=staleness.inverse_sqrt())
    state = ServerState(w=torch.zeros(2, dtype=torch.float64), version=3)
    base = torch.zeros(2, dtype=torch.float64)
    assert agg.submit(state, upd([2.0, 0.0], base=3), base) == Verdict.BUFFERED  # d=0, weight 1
    assert state.version == 3 and agg.pending == 1
    assert agg.submit(state, upd([0.0, 4.0], base=0), base) == Verdict.STEPPED  # d=3, weight 1/2
    # w = 0 - (1 * [2, 0] + 0.5 * [0, 4]) / 2 = [-1, -1]
    assert state.version == 4 and agg.pending == 0
    assert torch.allclose(state.w, torch.tensor([-1.0, -1.0], dtype=torch.float64))


@pytest.mark.parametrize("example_weight", ["n", "uniform"])
def test_fedbuff_with_k_equal_cohort_is_fedavg(example_weight):
    torch.manual_seed(0)
    w0 = torch.randn(50, dtype=torch.float64)
    sizes = [5, 17, 3, 40, 11] if example_weight == "n" else [8] * 5
    updates = [upd(torch.randn(50).tolist(), n=n, base=7, cid=i) for i, n in enumerate(sizes)]
    avg = aggregators.fedavg(server_opt.SGD(lr=1.0))
    buf = aggregators.fedbuff(
        server_opt.SGD(lr=1.0),
        buffer_size=len(updates),
        staleness=staleness.inverse_sqrt(),
        example_weight=example_weight,
        normalize="weight" if example_weight == "n" else "count",
    )
    s_avg, s_buf = ServerState(w0.clone(), 7), ServerState(w0.clone(), 7)
    for u in updates:
        avg.submit(s_avg, u, w0)
        buf.submit(s_buf, u, w0)
    assert avg.flush(s_avg)  # the round barrier
    assert not buf.flush(s_buf)  # already stepped on its K-th update
    expected = w0 - sum(n * u.delta for n, u in zip(sizes, updates)) / sum(sizes)
    assert torch.allclose(s_avg.w, expected)
    assert torch.allclose(s_buf.w, s_avg.w)
    assert s_avg.version == s_buf.version == 8


def test_update_older_than_max_staleness_is_discarded_and_changes_nothing():
    for agg in (
        aggregators.fedbuff(server_opt.SGD(), 1, staleness.constant(), max_staleness=2),
        aggregators.FedAsync(0.5, staleness.constant(), max_staleness=2),
    ):
        state = ServerState(w=torch.ones(3, dtype=torch.float64), version=10)
        assert agg.submit(state, upd([1.0, 1.0, 1.0], base=7), state.w) == Verdict.DISCARDED
        assert state.version == 10 and torch.equal(state.w, torch.ones(3, dtype=torch.float64))
        assert agg.pending == 0
        assert agg.submit(state, upd([1.0, 1.0, 1.0], base=8), state.w) == Verdict.STEPPED  # d=2 still ok


def test_flush_of_empty_buffer_does_not_step():
    agg = aggregators.fedavg(server_opt.SGD())
    state = ServerState(w=torch.ones(2), version=0)
    assert not agg.flush(state)
    assert state.version == 0


def test_server_sgd_momentum_accumulates():
    opt = server_opt.SGD(lr=0.5, momentum=0.9)
    w = torch.zeros(1, dtype=torch.float64)
    g = torch.ones(1, dtype=torch.float64)
    w = opt.step(w, g)  # m = 1, w = -0.5
    w = opt.step(w, g)  # m = 1.9, w = -0.5 - 0.95
    assert w.item() == pytest.approx(-1.45)


@pytest.mark.parametrize("rule,v1", [("adam", 0.01 * 4), ("yogi", 0.01 * 4), ("adagrad", 4.0)])
def test_adaptive_server_optimizers_first_step(rule, v1):
    opt = server_opt.Adaptive(rule, lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    w = opt.step(torch.zeros(1, dtype=torch.float64), torch.full((1,), 2.0, dtype=torch.float64))
    m1 = 0.1 * 2.0
    assert w.item() == pytest.approx(-0.1 * m1 / (v1**0.5 + 1e-3))


def test_aggregator_state_round_trips():
    a = aggregators.fedbuff(server_opt.SGD(momentum=0.9), 3, staleness.constant())
    state = ServerState(torch.zeros(2, dtype=torch.float64), 0)
    a.submit(state, upd([1.0, 2.0]), state.w)
    b = aggregators.fedbuff(server_opt.SGD(momentum=0.9), 3, staleness.constant())
    b.load_state_dict(a.state_dict())
    for agg in (a, b):
        s = ServerState(state.w.clone(), 0)
        agg.submit(s, upd([3.0, 3.0]), s.w)
        agg.submit(s, upd([2.0, 1.0]), s.w)
        assert torch.allclose(s.w, torch.tensor([-2.0, -2.0], dtype=torch.float64))


def test_clipping_bounds_each_updates_norm_before_weighting():
    agg = aggregators.fedbuff(server_opt.SGD(lr=1.0), buffer_size=2, staleness=staleness.constant(), clip_norm=1.0)
    state = ServerState(w=torch.zeros(2, dtype=torch.float64), version=0)
    base = torch.zeros(2, dtype=torch.float64)
    agg.submit(state, upd([3.0, 4.0]), base)  # norm 5: scaled to [0.6, 0.8]
    agg.submit(state, upd([0.5, 0.0]), base)  # within the bound: unchanged
    assert torch.allclose(state.w, -torch.tensor([1.1, 0.8], dtype=torch.float64) / 2)


def _round_with_a_half_done_update(agg) -> float:
    state = ServerState(w=torch.zeros(1, dtype=torch.float64), version=0)
    base = torch.zeros(1, dtype=torch.float64)
    full, partial = upd([1.0], n=10), upd([4.0], n=10)
    full.steps = full.planned_steps = 10
    partial.steps, partial.planned_steps = 5, 10  # a straggler stopped half way
    agg.submit(state, full, base)
    agg.submit(state, partial, base)
    agg.flush(state)
    return state.w.item()


def test_fedavg_weighs_partial_work_at_full_n_by_default():
    """FedProx's reference aggregation: a partial solution counts with its n_k."""
    assert _round_with_a_half_done_update(aggregators.fedavg(server_opt.SGD(lr=1.0))) == pytest.approx(
        -(10 * 1.0 + 10 * 4.0) / 20
    )


def test_fedavg_weighs_partial_work_by_the_share_of_steps_done():
    agg = aggregators.fedavg(server_opt.SGD(lr=1.0), partial_weight="work_fraction")  # weight 10 * 0.5
    assert _round_with_a_half_done_update(agg) == pytest.approx(-(10 * 1.0 + 5 * 4.0) / 15)


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "perfedavg"])
@pytest.mark.parametrize("partial_weight, expected", [(None, -2.5), ("full", -2.5), ("work_fraction", -2.0)])
def test_round_aggregation_config_sets_the_partial_weight(algorithm, partial_weight, expected):
    from asyncfl.build import build_aggregator
    from asyncfl.config import RunSpec

    a = {"name": algorithm} | ({"partial_weight": partial_weight} if partial_weight else {})
    spec = RunSpec.model_validate({"name": "r", "algorithm": a})
    assert _round_with_a_half_done_update(build_aggregator(spec, 0.1)) == pytest.approx(expected)


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("median", [1.5, -1.0]),  # even count: mean of the middle two of (-100, 1, 2, 3), (-2, -1, -1, 100)
        ("trimmed_mean", [1.5, -1.0]),  # 4 updates, trim 0.25: one dropped from each end
    ],
)
def test_robust_rules_ignore_the_outlier(rule, expected):
    agg = aggregators.RobustAggregator(server_opt.SGD(lr=1.0), rule, trim_fraction=0.25)
    state = ServerState(w=torch.zeros(2, dtype=torch.float64), version=0)
    base = torch.zeros(2, dtype=torch.float64)
    for d in ([1.0, -1.0], [2.0, -2.0], [3.0, -1.0], [-100.0, 100.0]):
        assert agg.submit(state, upd(d), base) == Verdict.BUFFERED
    assert agg.flush(state) and state.version == 1
    assert torch.allclose(state.w, -torch.tensor(expected, dtype=torch.float64))


def test_median_of_odd_count_is_the_middle_value():
    agg = aggregators.RobustAggregator(server_opt.SGD(lr=1.0), "median")
    state = ServerState(w=torch.zeros(1, dtype=torch.float64), version=0)
    for d in (5.0, -7.0, 1.0):
        agg.submit(state, upd([d]), torch.zeros(1, dtype=torch.float64))
    agg.flush(state)
    assert state.w.item() == pytest.approx(-1.0)


def test_qfedavg_step_matches_hand_computation():
    # q = 1, L = 2: dw_k = 2 delta_k; numerator F_k dw_k; denominator q |dw_k|^2 + L F_k
    agg = aggregators.QFedAvg(q=1.0, lipschitz=2.0)
    state = ServerState(w=torch.tensor([1.0, 1.0], dtype=torch.float64), version=0)
    base = state.w.clone()
    a, b = upd([1.0, 0.0]), upd([0.0, 0.5])
    a.start_loss, b.start_loss = 0.5, 2.0
    agg.submit(state, a, base)
    agg.submit(state, b, base)
    agg.flush(state)
    num = 0.5 * torch.tensor([2.0, 0.0]) + 2.0 * torch.tensor([0.0, 1.0])
    den = (4.0 + 2 * 0.5) + (1.0 + 2 * 2.0)
    assert torch.allclose(state.w, torch.tensor([1.0, 1.0]).double() - num.double() / den)


def test_qfedavg_with_q_zero_is_the_plain_mean():
    agg = aggregators.QFedAvg(q=0.0, lipschitz=10.0)
    state = ServerState(w=torch.zeros(1, dtype=torch.float64), version=0)
    for d, f in ((1.0, 0.1), (3.0, 5.0)):
        u = upd([d])
        u.start_loss = f
        agg.submit(state, u, torch.zeros(1, dtype=torch.float64))
    agg.flush(state)
    assert state.w.item() == pytest.approx(-2.0)


def test_qfedavg_rejects_an_update_without_its_start_loss():
    agg = aggregators.QFedAvg(q=1.0, lipschitz=1.0)
    state = ServerState(w=torch.zeros(1, dtype=torch.float64), version=0)
    with pytest.raises(ValueError, match="loss at the downloaded model"):
        agg.submit(state, upd([1.0]), torch.zeros(1, dtype=torch.float64))
    assert agg.pending == 0 and state.version == 0
