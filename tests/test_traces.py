"""Device traces: values from CSV and FedScale-style files land on devices as written, devices
are online exactly in their intervals (repeating every period), a larger population samples the
trace the same way in both profile modes, simulated trips start only on online devices, and
bad trace files are refused naming the problem."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from asyncfl import config
from asyncfl.config import ConfigError, PopulationConfig
from asyncfl.experiment import build_simulation, run_experiment
from asyncfl.sim.population import Population
from asyncfl.sim.trace_presets import phones
from asyncfl.sim.traces import load_availability, load_capacity

CAPACITY = """device,compute_s_per_example,download_bytes_per_s,upload_bytes_per_s
a,0.01,1000,500
b,0.02,2000,600
c,0.04,4000,700
"""
AVAILABILITY = """device,start,end
a,0,10
a,50,60
b,10,20
c,90,100
"""


@pytest.fixture
def csv_traces(tmp_path):
    (tmp_path / "capacity.csv").write_text(CAPACITY)
    (tmp_path / "availability.csv").write_text(AVAILABILITY)
    return {"capacity": str(tmp_path / "capacity.csv"), "availability": str(tmp_path / "availability.csv")}


def population(devices, traces, profiles="arrays", seed=1):
    cfg = PopulationConfig(devices=devices, profiles=profiles, traces=traces)
    return Population(cfg, np.random.SeedSequence(seed))


def device_values(pop, n):
    ids = np.arange(n)
    return list(zip(pop.compute_per_example[ids], pop.download_bandwidth[ids], pop.upload_bandwidth[ids], strict=True))


ROWS = {(np.float32(0.01), 1000, 500): "a", (np.float32(0.02), 2000, 600): "b", (np.float32(0.04), 4000, 700): "c"}
ONLINE = {"a": [(0, 10), (50, 60)], "b": [(10, 20)], "c": [(90, 100)]}


def online(device_row: str, t: float) -> bool:
    return any(s <= t % 100 < e for s, e in ONLINE[device_row])


@pytest.mark.parametrize("profiles", ["arrays", "on_demand"])
def test_csv_values_and_intervals_land_on_the_devices_a_subset_of_rows(csv_traces, profiles):
    pop = population(2, csv_traces, profiles)
    rows = [ROWS[v] for v in device_values(pop, 2)]  # each device is one trace row, whole
    assert len(set(rows)) == 2  # a population no larger than the trace: distinct rows
    assert pop.phase is None
    for t in [0, 5, 9.99, 10, 15, 20, 55, 95, 99.99, 100, 105, 155, 1015]:
        expect = [online(r, t) for r in rows]  # period: the latest end, 100
        assert pop.available(np.arange(2), t).tolist() == expect, t
        assert [pop.traced.active_one(d, t) for d in range(2)] == expect, t
        picked = pop.pick(2, t, np.random.default_rng(0))
        assert sorted(picked) == [d for d in range(2) if expect[d]], t


def test_a_larger_population_samples_rows_alike_in_both_modes(csv_traces):
    n = 30_000
    arrays = population(n, csv_traces, "arrays")
    lazy = population(n, csv_traces, "on_demand")
    rows = [ROWS[v] for v in device_values(arrays, n)]
    assert device_values(lazy, 200) == device_values(arrays, 200)
    assert [lazy.compute_per_example.item(d) for d in range(50)] == arrays.compute_per_example[:50].tolist()
    share = {r: rows.count(r) / n for r in "abc"}
    assert all(abs(s - 1 / 3) < 0.02 for s in share.values()), share
    for t in [5, 15, 95]:  # capacity and availability come from the same device of the trace
        assert arrays.available(np.arange(300), t).tolist() == [online(r, t) for r in rows[:300]]
        assert lazy.available(np.arange(300), t).tolist() == [online(r, t) for r in rows[:300]]
    other = population(n, csv_traces, "arrays", seed=2)
    assert device_values(other, 200) != device_values(arrays, 200)  # the seed draws the mapping


def test_a_population_of_10_8_follows_the_trace_on_demand(csv_traces):
    pop = population(10**8, csv_traces, "auto")
    assert pop.size == 10**8 and pop.busy.nbytes == 10**8
    ids = np.arange(10**8 - 1000, 10**8)
    rows = [ROWS[v] for v in zip(pop.compute_per_example[ids], pop.download_bandwidth[ids], pop.upload_bandwidth[ids])]
    assert pop.available(ids, 15).tolist() == [r == "b" for r in rows]
    for d in pop.pick(50, 15.0, np.random.default_rng(3)):
        assert pop.download_bandwidth.item(d) == 2000.0
    rng = np.random.default_rng(4)
    assert len(set(pop.pick(5000, 95.0, rng))) == 5000  # a third online: found without scanning 10^8
    examined, active = [], pop.traced.active
    pop.traced.active = lambda ids, t: examined.append(len(ids)) or active(ids, t)
    assert pop.pick(1, 30.0, rng) == [] and pop.pick(20, 30.0, rng) == []  # nobody online at 30 s
    assert 10**5 < sum(examined) < 5 * 10**6  # many candidates, but no scan of the 10^8 devices


def test_fedscale_pickles_convert_units_and_read_on_off_times(tmp_path):
    capacity = {7: {"computation": 50.0, "communication": 8000.0}, 3: {"computation": 120.0, "communication": 800.0}}
    behaviour = {
        3: {"duration": 100, "finish_time": 100, "active": [10, 60], "inactive": [30, 80], "model": "phone"},
        7: {"duration": 200, "active": [50], "inactive": [20]},  # starts online, back at 50 until the end
    }
    (tmp_path / "cap.pkl").write_bytes(pickle.dumps(capacity))
    (tmp_path / "beh.pkl").write_bytes(pickle.dumps(behaviour))
    traces = {"format": "fedscale", "capacity": str(tmp_path / "cap.pkl"), "availability": str(tmp_path / "beh.pkl")}
    pop = population(2, traces)
    by_compute = {round(float(c), 4): (float(d), float(u)) for c, d, u in device_values(pop, 2)}
    # ms per example -> s; kbit/s -> bytes/s, both ways
    assert by_compute == {0.05: (1.0e6, 1.0e6), 0.12: (1.0e5, 1.0e5)}
    trace = load_availability(traces["availability"], "fedscale")
    assert trace.active([0] * 6, 0).tolist() == [False] * 6  # row 0 is client 3 (sorted ids)
    times = [5, 10, 29, 30, 65, 120]  # client 3: online [10, 30) and [60, 80), period 100
    assert [trace.active_one(0, t) for t in times] == [False, True, True, False, True, True]
    times = [0, 19, 20, 49, 50, 199, 210]  # client 7: online [0, 20) and [50, 200), period 200
    assert [trace.active_one(1, t) for t in times] == [True, True, False, False, True, True, True]
    assert abs(trace.on_fraction() - (0.4 + 0.85) / 2) < 1e-12
    # the same clients in both files: a device follows one client in both
    for d in range(2):
        client_row = 0 if pop.compute_per_example[d] > 0.1 else 1
        assert pop.traced.rows.item(d) == client_row


def test_trips_start_only_on_online_devices(csv_traces):
    tree = config.preset_dict("quickstart")
    tree["population"]["devices"] = 40
    tree["population"]["retry_interval"] = 5
    tree["population"]["traces"] = csv_traces
    tree["runs"] = [r for r in tree["runs"] if r["name"] == "fedbuff"]
    tree["stop"] = {"max_time": 300}
    cfg = config.validate(tree)
    sim = build_simulation(cfg, cfg.runs[0])
    starts = []
    sim.trace = lambda event, trip: starts.append((trip.device, trip.start)) if event == "start" else None
    sim.run()
    assert len(starts) > 50
    assert all(sim.population.available(np.array([d]), t)[0] for d, t in starts)
    assert {int(t) % 100 for _, t in starts} - set(range(0, 20)) - set(range(50, 60)) - set(range(90, 100)) == set()


def bad(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize(
    "traces, message",
    [
        ({"capacity": "/nonexistent/capacity.csv"}, "does not exist"),
        ({"capacity": ("c.csv", "device,compute,download\na,1,2\n")}, "columns must be device,compute_s_per_example"),
        ({"capacity": ("c.csv", CAPACITY.replace("0.02", "-0.02"))}, "compute_s_per_example must be non-negative"),
        ({"capacity": ("c.csv", CAPACITY.replace("2000", "0"))}, "download_bytes_per_s must be positive"),
        ({"capacity": ("c.csv", CAPACITY.splitlines()[0] + "\n")}, "no rows"),
        ({"capacity": ("c.csv", CAPACITY + "a,1,1,1\n")}, "device 'a' appears twice"),
        ({"availability": ("a.csv", "device,start,end\na,10,5\n")}, "must come after start"),
        ({"availability": ("a.csv", "device,start,end\na,0,50\n"), "period": 40}, "after the period 40"),
        ({"availability": ("a.csv", "device,start,end\n")}, "no rows"),
        ({"format": "fedscale", "capacity": ("c.pkl", "not a pickle")}, "not a pickled FedScale trace"),
        ({"period": 10}, "give capacity, availability or both"),
        ({"capacity": "builtin:nothing/capacity.csv"}, "no such generated trace"),
    ],
)
def test_bad_traces_are_config_errors_naming_the_problem(tmp_path, traces, message):
    traces = {k: bad(tmp_path, *v) if isinstance(v, tuple) else v for k, v in traces.items()}
    tree = config.preset_dict("quickstart")
    tree["population"]["traces"] = traces
    with pytest.raises(ConfigError, match="population.traces") as err:
        config.validate(tree)
    assert message in str(err.value)


def test_fedscale_records_missing_keys_are_named(tmp_path):
    (tmp_path / "cap.pkl").write_bytes(pickle.dumps({1: {"computation": 5.0}}))
    (tmp_path / "beh.pkl").write_bytes(pickle.dumps({1: {"active": [1], "inactive": [2]}}))
    with pytest.raises(ConfigError, match="needs 'computation' and 'communication'"):
        config.validate(
            dict(
                config.preset_dict("quickstart"),
                population={"traces": {"format": "fedscale", "capacity": str(tmp_path / "cap.pkl")}},
            )
        )
    with pytest.raises(ConfigError, match="needs 'finish_time' or 'duration'"):
        config.validate(
            dict(
                config.preset_dict("quickstart"),
                population={"traces": {"format": "fedscale", "availability": str(tmp_path / "beh.pkl")}},
            )
        )


def test_the_generated_phones_trace_is_fixed_and_swings_together():
    assert phones() == phones()
    cap = load_capacity("builtin:phones/capacity.csv", "csv")
    trace = load_availability("builtin:phones/availability.csv", "csv", 600.0)
    assert cap.rows == trace.rows == 60 and set(cap.ids) == set(trace.ids)
    assert 0.3 < trace.on_fraction() < 0.5
    online = [trace.active(np.arange(60), t).mean() for t in range(0, 600, 50)]
    assert max(online) > 0.9 and min(online) < 0.1  # a shared night, a nearly empty day


def test_traces_preset_quick_runs_both_methods(tmp_path):
    summary = run_experiment(config.load(preset="traces", quick=True), tmp_path, threads=1)
    runs = {r["name"]: r for r in summary["runs"]}
    assert set(runs) == {"fedavg", "fedbuff"}
    for r in runs.values():
        assert r["final_accuracy"] > 0.85, r["name"]
    # memory: each run's process peak as it ended, the experiment's at the end (one process here)
    peaks = [runs["fedavg"]["peak_rss_mb"], runs["fedbuff"]["peak_rss_mb"], summary["peak_rss_mb"]["main"]]
    assert 50 < peaks[0] <= peaks[1] <= peaks[2] < 4096
    assert json.loads((tmp_path / "summary.json").read_text())["peak_rss_mb"] == summary["peak_rss_mb"]


def test_the_round_timeout_sample_follows_the_traced_capacity(tmp_path):
    from asyncfl.study.timeouts import trip_durations

    def durations(compute):
        (tmp_path / "one.csv").write_text(CAPACITY.splitlines()[0] + f"\nx,{compute},1.0e+6,2.5e+5\n")
        tree = config.preset_dict("quickstart")
        tree["population"]["traces"] = {"capacity": str(tmp_path / "one.csv")}
        return trip_durations(config.validate(tree))

    slow, fast = durations(0.5), durations(0.05)
    assert len(slow) == 100 and np.all(np.isfinite(slow))
    # one trace row: every device has its speeds, so durations differ only by the work per client
    work = (slow - fast) / (0.5 - 0.05)  # examples trained per trip
    assert np.allclose(work, np.round(work), atol=1e-3) and work.min() >= 1
