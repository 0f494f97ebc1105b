"""bench/ray_scale.py runs in its quick mode and its JSON holds the figures it promises, each
consistent with the others."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'asyncfl[ray]'")

ROOT = Path(__file__).resolve().parents[1]


def test_heavy_clients_take_full_minibatches():
    """Every heavy-task client holds at least a minibatch, so each local step trains on a full
    one in asyncfl and in the Flower peer alike."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from ray_scale import HEAVY, heavy_data
    finally:
        sys.path.remove(str(ROOT / "bench"))
    data = heavy_data(40)
    sizes = data.client_sizes()
    assert data.num_features == 32 * 32 * 3 and data.num_classes == HEAVY["classes"]
    assert sizes.min() >= HEAVY["batch"] and sizes.max() <= 64 and sizes.min() < sizes.max()


@pytest.mark.slow  # a whole benchmark run (about 30-50 s): make test-slow
def test_quick_run_reports_every_figure():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1")
    env.pop("RAY_worker_niceness", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ray_scale.py"), "--quick", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["quick"] is True and out["threads"] == 1 and out["ray_worker_niceness"] == 0
    heavy, mlp = out["tasks"]
    assert (heavy["task"], heavy["model"], heavy["params"]) == ("heavy", "CifarCNN", 1_756_426)
    assert (mlp["task"], mlp["model"], mlp["local_steps"], mlp["batch_size"]) == ("mlp", "MLP", 10, 16)
    assert heavy["pool"] == heavy["clients"] == 2 and mlp["pool"] == 64
    assert (heavy["repeats"], mlp["repeats"]) == (1, 3)
    for row in (heavy, mlp):
        seconds = row["seconds_per_update"]  # per repeat: local, ray1, ray2
        assert all(len(seconds[e]) == row["repeats"] and min(seconds[e]) > 0 for e in ("local", "ray1", "ray2"))
        for e in ("local", "ray1", "ray2"):
            assert row[f"{e}_updates_per_s"] == pytest.approx(1 / statistics.median(seconds[e]))
            assert row[f"{e}_cpu_ms_per_update"] > 0 and 0 < row[f"{e}_cores_used"] <= 2.5, row
        repeats = list(zip(seconds["local"], seconds["ray1"], seconds["ray2"], strict=True))
        assert row["ray2_over_ray1"] == pytest.approx(statistics.median(r1 / r2 for _, r1, r2 in repeats))
        assert row["ray2_over_local"] == pytest.approx(statistics.median(lo / r2 for lo, _, r2 in repeats))
        assert row["overhead_ms_per_job"] == pytest.approx(statistics.median(1000 * (r1 - lo) for lo, r1, _ in repeats))
        assert 0 < row["machine_two_worker_speedup"] < 3
        assert len(row["ray1_actor_peak_rss_mb"]) == 1 and len(row["ray2_actor_peak_rss_mb"]) == 2
        assert all(100 < p < 4000 for p in row["ray1_actor_peak_rss_mb"] + row["ray2_actor_peak_rss_mb"]), row
    goals = out["goals"]
    assert goals["heavy_ray2_over_ray1"]["value"] == heavy["ray2_over_ray1"]
    assert goals["mlp_ray2_over_local"]["value"] == mlp["ray2_over_local"]
    for g in goals.values():
        assert g["met"] == (g["value"] >= g["goal"])
    assert out["overhead_ms_per_job"] == mlp["overhead_ms_per_job"]
    assert out["driver_peak_rss_mb"] > 100
    assert "flower" not in out  # only with --peer flower
