"""Sync rounds fold at most `cohort` updates, partial stragglers included; the policy contract."""

from asyncfl.algorithms.types import Verdict
from asyncfl.experiment import build_simulation
from asyncfl.scheduling import AsyncPolicy, SyncPolicy


def folded_per_round(sim):
    """Counts of updates the aggregator accepted between consecutive flushes."""
    counts, agg = [0], sim.aggregator
    submit, flush = agg.submit, agg.flush

    def counting_submit(state, update, base_w):
        verdict = submit(state, update, base_w)
        if verdict != Verdict.DISCARDED:
            counts[-1] += 1
        return verdict

    def counting_flush(state):
        counts.append(0)
        return flush(state)

    agg.submit, agg.flush = counting_submit, counting_flush
    return counts


def test_partial_stragglers_never_push_a_round_past_its_cohort(small):
    cfg = small(
        sets=[
            "runs.fedavg.scheduler.concurrency=10",
            "runs.fedavg.scheduler.over_selection=0.3",
            "runs.fedavg.scheduler.round_timeout=6",
            "runs.fedavg.scheduler.straggler=partial",
        ]
    )
    sim = build_simulation(cfg, cfg.run("fedavg"))
    assert sim.policy.selected == 13
    counts = folded_per_round(sim)
    m = sim.run()
    assert m.server_steps > 5
    assert max(counts) == 10  # full rounds happen, none folds more than its cohort
    assert m.cancelled > 0  # the partial stragglers beyond the cohort were cancelled


class FakeRuntime:
    """Records what a policy asks of its runtime; every trip reports partial work."""

    def __init__(self, partial_steps):
        self.partial_steps, self.started, self.timers, self.submitted = partial_steps, 0, [], []
        self.in_flight = 0

    def request_clients(self, n):
        self.started += n
        self.in_flight += n
        return n

    def expect_reports(self, n):
        pass

    def set_timer(self, delay, payload):
        self.timers.append(payload)

    def submit(self, trip, update):
        self.submitted.append(trip)
        return Verdict.BUFFERED

    def flush(self):
        return True

    def cancel_in_flight(self):
        self.in_flight = 0

    def collect_partial(self, limit):
        chosen = sorted(range(len(self.partial_steps)), key=lambda i: (-self.partial_steps[i], i))[:limit]
        return [(i, None) for i in sorted(chosen)]


def test_deadline_asks_only_for_the_missing_updates():
    rt = FakeRuntime(partial_steps=[1, 4, 2, 4, 3])
    policy = SyncPolicy(cohort=5, over_selection=0.0, round_timeout=10.0, straggler="partial")
    policy.start(rt)
    assert policy.on_report(rt, "a", None) == Verdict.BUFFERED
    assert policy.on_report(rt, "b", None) == Verdict.BUFFERED
    deadline = rt.timers[0]
    assert policy.is_deadline(deadline)
    rt.submitted.clear()
    policy.on_timer(rt, deadline)
    assert rt.submitted == [1, 3, 4]  # 5 - 2 arrived: the three that did most, in start order
    assert not policy.is_deadline(deadline)  # the next round's deadline is another timer
    assert policy.status() == {"round": {"number": 2, "open": True, "arrived": 0}}


def test_policy_state_round_trips_and_a_closed_round_submits_nothing():
    rt = FakeRuntime([])
    policy = SyncPolicy(cohort=3, round_timeout=5.0)
    policy.start(rt)
    policy.on_report(rt, "a", None)
    twin = SyncPolicy(cohort=3, round_timeout=5.0)
    twin.load_state_dict(policy.state_dict())
    assert twin.status() == policy.status() == {"round": {"number": 1, "open": True, "arrived": 1}}
    assert twin.is_deadline(rt.timers[0])
    twin.open = False
    assert twin.on_report(rt, "late", None) is None and "late" not in rt.submitted
    assert AsyncPolicy(4).state_dict() == {} and AsyncPolicy(4).status() == {}


class RefusingRuntime(FakeRuntime):
    """The server refuses the trips named in `refused` (a norm or filter refusal)."""

    def __init__(self, refused):
        super().__init__([])
        self.refused, self.flushes = refused, 0

    def submit(self, trip, update):
        self.submitted.append(trip)
        return Verdict.DISCARDED if trip in self.refused else Verdict.BUFFERED

    def flush(self):
        self.flushes += 1
        return True


def test_refused_reports_count_towards_the_cohort():
    """A round waits for `cohort` reports, refused ones included: otherwise each refusal makes
    it wait for another straggler, and attackers whose updates are all refused set its pace."""
    rt = RefusingRuntime(refused={"b"})
    policy = SyncPolicy(cohort=3, over_selection=1.0)  # 6 selected, the round closes at 3 reports
    policy.start(rt)
    assert policy.on_report(rt, "a", None) == Verdict.BUFFERED
    assert policy.on_report(rt, "b", None) == Verdict.DISCARDED
    policy.on_refused(rt, "c")  # refused by the server's own checks, before the policy saw it
    assert rt.flushes == 1 and policy.round == 2  # closed at three reports, three still in flight were cancelled
    policy.on_report(rt, "d", None)
    policy.on_lost(rt, "e")  # a lost trip is not a report: the round stays open
    assert rt.flushes == 1 and policy.status()["round"]["arrived"] == 1
    async_rt = RefusingRuntime(refused=set())
    a = AsyncPolicy(4)
    a.start(async_rt)
    async_rt.in_flight -= 1
    a.on_refused(async_rt, "x")  # asynchronous: the slot reopens at once
    assert async_rt.started == 5
