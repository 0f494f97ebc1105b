"""bench/server_scale.py --quick --json runs every target and reports what the docs quote: rates,
latencies (at saturation and at the goal's rate), per-process CPU, shedding, and no acknowledged upload missing from the update log."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a whole benchmark run (about 30-50 s): make test-slow
def test_quick_scale_bench_reports_every_target(tmp_path):
    from asyncfl.cluster.postgres import PostgresNotInstalled, find_bindir

    try:
        find_bindir()
    except PostgresNotInstalled as err:
        pytest.skip(str(err))
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "server_scale.py"), "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    assert result["devices"] == 10_000 and result["params"] == 4810
    assert set(result["targets"]) == {"single", "cluster-1", "cluster-2"}
    for name, target in result["targets"].items():
        sustained, overload = target["sustained"], target["overload"]
        assert sustained["checkins_per_s"] > 0 and sustained["checkin_p99_ms"] >= sustained["checkin_p50_ms"]
        assert sustained["updates_per_s"] > 0 and 0 < sustained["train_fraction"] < 1
        selectors = 0 if name == "single" else int(name.split("-")[1])
        if name == "single":
            processes = {"server", "loadgen"}
        else:
            processes = {"aggregator", "coordinator", "postgres", "loadgen"}
            processes |= {f"selector-{i + 1}" for i in range(selectors)}
        assert set(sustained["cpu_cores"]) == processes
        assert all(cores >= 0 for cores in sustained["cpu_cores"].values())
        assert sustained["checkins_per_selector_core"] > 0
        # each serving process on a core of its own where the machine has one more, else shared
        serving = {"server"} if name == "single" else {f"selector-{i + 1}" for i in range(selectors)}
        cores, placement = os.sched_getaffinity(0), target["placement"]
        if len(cores) > len(serving):
            own = [placement[process] for process in serving]
            assert all(len(c) == 1 for c in own) and len({c[0] for c in own}) == len(serving)
            assert not {c[0] for c in own} & set(placement["others"]) and set(placement) == serving | {"others"}
        else:
            assert placement is None
        at_goal = target["goal_rate"]  # 2,000 check-ins/s offered to each selector
        assert at_goal["offered_per_s"] == pytest.approx(2000 * max(1, selectors), rel=0.02)
        assert at_goal["checkins_per_s"] > 0 and at_goal["checkin_p99_ms"] >= at_goal["checkin_p50_ms"]
        assert set(at_goal["cpu_cores"]) == processes
        assert overload["offered_x"] == pytest.approx(10.0, abs=0.1)
        assert overload["sent_per_s"] <= overload["offered_per_s"]
        assert overload["acknowledged_total"] > 0
        # exactly once: every upload answered 200 is in the update log, once
        assert overload["lost"] == 0 and overload["duplicated"] == 0
        assert overload["shed_without_retry_after"] == 0
        # a check-in budget on every selector, offered tenfold: refusals say when to come back
        budgeted = target["overload_budget"]
        assert budgeted["budget_per_s"] == 250 * max(1, selectors)
        assert budgeted["offered_x"] == pytest.approx(10.0, abs=0.1)
        assert budgeted["shed_total"] > 0 and budgeted["shed_without_retry_after"] == 0
        assert budgeted["lost"] == 0 and budgeted["duplicated"] == 0
    assert all(isinstance(met, bool) for met in result["goals"].values())
    assert len(result["goals"]) == 8
