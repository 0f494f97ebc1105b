import json

from asyncfl.experiment import build_simulation, run_experiment
from asyncfl.sim.executor import SequentialExecutor


class RecordingExecutor(SequentialExecutor):
    """Remembers every update it produced, to check what reached the aggregator."""

    def __init__(self, inner):
        super().__init__(inner.trainer, inner.data)
        self.updates = []

    def result(self, job_id):
        u = super().result(job_id)
        self.updates.append(u)
        return u


def sim_with_recorder(cfg, run):
    sim = build_simulation(cfg, cfg.run(run))
    sim.executor = RecordingExecutor(sim.executor)
    return sim


def strip_wall(summary):
    for r in summary["runs"]:
        r.pop("wall_seconds"), r.pop("peak_rss_mb")  # measured, not computed
    summary.pop("peak_rss_mb")
    return summary


def test_same_seed_same_summary_different_seed_different(small, tmp_path):
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        run_experiment(small(seed=seed), tmp_path / str(i))
        outs.append(strip_wall(json.loads((tmp_path / str(i) / "summary.json").read_text())))
    assert outs[0] == outs[1]
    assert outs[0] != outs[2]
    assert outs[0]["runs"][1]["final_accuracy"] != outs[2]["runs"][1]["final_accuracy"]


def test_fedbuff_learns_digits(small):
    m = build_simulation(small(), small().run("fedbuff")).run()
    assert m.rows[0]["test_accuracy"] < 0.3
    assert m.rows[-1]["test_accuracy"] > 0.8


def test_dropped_devices_yield_no_update_but_count_their_trip(small):
    cfg = small(sets=["population.dropout=0.3"])
    sim = sim_with_recorder(cfg, "fedbuff")
    m = sim.run()
    assert m.dropped > 20
    # every trip is accounted for, and only completed trips produced updates
    assert m.started == m.completed + m.dropped + m.cancelled + sim.in_flight
    assert len(sim.executor.updates) == m.completed
    assert m.rows[-1]["trips_dropped"] == m.dropped
    assert m.bytes_up == m.completed * sim.model_bytes
    assert m.bytes_down == m.started * sim.model_bytes


def test_updates_older_than_max_staleness_are_discarded_and_counted(small):
    cfg = small(sets=["runs.fedbuff.algorithm.max_staleness=1", "runs.fedbuff.algorithm.buffer_size=1"])
    sim = sim_with_recorder(cfg, "fedbuff")
    m = sim.run()
    accepted = sum(m.staleness.values())
    assert m.discarded > 10
    assert max(m.staleness) <= 1
    assert accepted + m.discarded == m.completed
    assert m.server_steps == accepted  # K = 1: every accepted update is one step


def test_sync_over_selection_cancels_the_late_clients(small):
    sim = build_simulation(small(), small().run("fedavg"))  # cohort 8, 10 selected
    m = sim.run()
    rounds = m.server_steps
    assert rounds > 5
    assert m.cancelled >= 2 * (rounds - 1)  # each closed round cancels its 2 slowest
    assert set(m.staleness) == {0}  # sync: every update starts from the current version


def test_sync_partial_work_is_accepted_with_fewer_steps(small):
    cfg = small(
        sets=[
            "runs.fedavg.scheduler.round_timeout=6",
            "runs.fedavg.scheduler.straggler=partial",
            "runs.fedavg.scheduler.over_selection=0",
        ]
    )
    sim = sim_with_recorder(cfg, "fedavg")
    m = sim.run()
    steps = [u.steps for u in sim.executor.updates]
    assert min(steps) < 5 and max(steps) == 5
    assert m.server_steps > 5


def test_sync_drop_policy_with_timeout_cancels_stragglers(small):
    cfg = small(sets=["runs.fedavg.scheduler.round_timeout=6", "runs.fedavg.scheduler.over_selection=0"])
    sim = sim_with_recorder(cfg, "fedavg")
    m = sim.run()
    assert m.cancelled > 0
    assert all(u.steps == 5 for u in sim.executor.updates)


def test_event_queue_pops_by_time_and_ties_in_push_order():
    import random

    from asyncfl.sim.events import EventQueue

    q, ref = EventQueue(), []
    rng = random.Random(0)
    for i in range(2000):  # many exact ties (times on a coarse grid), pushes interleaved with pops
        t = rng.randrange(50) / 4
        q.push(t, i % 5, i)
        ref.append((t, i, i % 5))
        if i % 3 == 0:
            ref.sort()
            want = ref.pop(0)
            assert q.pop() == (want[0], want[2], want[1])
    ref.sort()
    got = [q.pop() for _ in range(len(q))]
    assert got == [(t, kind, i) for t, i, kind in ref] and len(q) == 0
