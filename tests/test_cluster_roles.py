"""The coordinator and aggregator as real processes (`asyncfl serve --role ...`), fed partial sums
as selectors write them: kill -9 of the aggregator that owns the task hands it to the other one,
and every partial's updates end up in exactly one version; kill -9 of the coordinator stops
nothing it does not need to."""

import os
import signal
import subprocess
import sys
import time

import pytest
from cluster_helpers import FEDBUFF, experiment, fetch, insert_partial, updates

from asyncfl.cluster.members import session
from asyncfl.cluster.partials import empty
from asyncfl.cluster.tasks import add_task, build_objects


def _role(url, role, tmp_path):
    log = open(tmp_path / f"{role}-{time.monotonic_ns()}.log", "w")
    env = os.environ | {"ASYNCFL_DATABASE_URL": url, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "asyncfl.cli", "serve", "--role", role, "--log-level", "info"]
    return subprocess.Popen([*command, "--member-timeout", "2"], env=env, stdout=log, stderr=subprocess.STDOUT)


def _until(what, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = what()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what.__doc__}")


def _owner(url):
    return fetch(url, "SELECT owner, owner_epoch, version FROM tasks")[0]


@pytest.mark.slow
def test_aggregator_and_coordinator_survive_kill_9(pg_url, tmp_path):
    cfg = experiment(FEDBUFF)  # K = 4
    with session(pg_url) as conn:
        add_task(conn, cfg)
    objects = build_objects(cfg)
    pool = updates(64, objects.model.numel)

    def feed(n_partials, start):
        """Partials of 1-3 updates, as selectors' group commits would write them."""
        used = 0
        for i in range(n_partials):
            size = 1 + (start + i) % 3
            p = empty()
            for u in pool[used : used + size]:
                p.add(objects.aggregator, u, 0)
            used += size
            insert_partial(pg_url, "fedbuff", p, selector=f"sel-{i % 2}")
        return used

    procs = [_role(pg_url, "aggregator", tmp_path), _role(pg_url, "aggregator", tmp_path)]
    coordinator = _role(pg_url, "coordinator", tmp_path)
    try:

        def owned():
            """an aggregator owning the task"""
            owner, epoch, _ = _owner(pg_url)
            return owner is not None and (owner, epoch)

        first_owner, first_epoch = _until(owned)
        sent = feed(6, 0)
        _until(lambda: _owner(pg_url)[2] >= 2)
        pid = int(first_owner.split("-")[-2])
        victim = next(p for p in procs if p.pid == pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        sent += feed(5, 1)  # arrive while the task has no live owner

        def taken_over():
            """the other aggregator taking the task over"""
            owner, epoch, _ = _owner(pg_url)
            return owner not in (None, first_owner) and epoch == first_epoch + 1

        _until(taken_over)
        coordinator.send_signal(signal.SIGKILL)
        coordinator.wait()
        sent += feed(4, 2)  # no coordinator: the aggregator goes on folding
        _until(lambda: fetch(pg_url, "SELECT count(*) FROM partials WHERE folded_version IS NULL")[0][0] <= 1)
        coordinator = _role(pg_url, "coordinator", tmp_path)  # back: nothing to fix
        time.sleep(2)
        assert _owner(pg_url)[1] == first_epoch + 1
    finally:
        for p in [*procs, coordinator]:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
    folded = fetch(
        pg_url, "SELECT coalesce(sum(count), 0) FROM partials WHERE folded_version IS NOT NULL AND discarded = 0"
    )[0][0]
    waiting = fetch(pg_url, "SELECT coalesce(sum(count), 0) FROM partials WHERE folded_version IS NULL")[0][0]
    steps = fetch(pg_url, "SELECT version, updates FROM versions ORDER BY version")
    assert folded + waiting == sent and waiting < 4  # less than one buffer left unstepped
    assert len(steps) <= cfg.server.keep_versions  # nothing pruned: every step's count is here
    assert sum(n for _, n in steps) == folded  # each folded update in exactly one version
    assert all(n >= 4 for v, n in steps if v > 0)  # K = 4: a step folds at least K
    per_version = fetch(pg_url, "SELECT folded_version, sum(count) FROM partials GROUP BY 1 ORDER BY 1")
    assert [(v, n) for v, n in per_version if v is not None] == [(v, n) for v, n in steps if v > 0]
    assert _owner(pg_url)[2] == steps[-1][0]
