"""When the disk fails: an update whose commit failed is never acknowledged, its re-send counts
exactly once, and after the rollback every count /status shows is the durable state's."""

from __future__ import annotations

import json
import random
import sqlite3
import threading
from contextlib import contextmanager

import pytest
from test_server_inputs import Harness

from asyncfl.server.errors import ApiError
from asyncfl.server.service import FLServer


@contextmanager
def failing_commits(server: FLServer, fails):
    """While inside: each store transaction runs its statements, then, when `fails()` says so,
    raises as a full disk would at COMMIT, so the store rolls it back."""
    real = server.store.transaction

    @contextmanager
    def transaction():
        with real() as db:
            yield db
            if fails():
                raise sqlite3.OperationalError("database or disk is full (injected)")

    server.store.transaction = transaction
    try:
        yield
    finally:
        server.store.transaction = real


def once():
    left = [1]

    def fails():
        left[0] -= 1
        return left[0] == 0

    return fails


def storage_error(call) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    assert (caught.value.status, caught.value.code) == (503, "storage_error")
    return caught.value


def rows_of(server: FLServer, client: str, key: str) -> list[tuple]:
    return server.store.query("SELECT seq, verdict FROM updates WHERE client=? AND idem_key=?", (client, key))


def test_an_update_rolled_back_is_not_acknowledged_even_after_a_later_commit_succeeds(tmp_path):
    with Harness(tmp_path) as h:
        server, commit = h.server, h.server.commit
        body = h.frame(h.checkin("a"), key="key-of-a")
        real_sync = commit.sync

        def interleaved(epoch):
            """Upload a's change waits for its commit while another request's commit fails
            (rolling a's change back) and a later request's commit succeeds."""
            commit.sync = real_sync
            with failing_commits(server, once()):
                storage_error(lambda: real_sync(commit.epoch))
            assert server.checkin("b")["action"] == "train"  # commits
            real_sync(epoch)

        commit.sync = interleaved
        storage_error(lambda: server.upload("a", body))
        assert rows_of(server, "a", "key-of-a") == []
        assert server.status()["updates"]["buffered"] == 0 and server.status()["buffer"]["fill"] == 0

        status, answer = server.upload("a", body)  # the client re-sends: folded now, once
        assert status == 200 and answer["verdict"] == "buffered" and "replayed" not in answer
        assert server.upload("a", body) == (200, answer | {"replayed": True})
        assert rows_of(server, "a", "key-of-a") == [(answer["seq"], "buffered")]
        assert server.status()["updates"]["buffered"] == 1 and server.status()["buffer"]["fill"] == 1


def test_epochs_committed_before_a_failure_stay_durable_and_lost_ones_stay_lost(tmp_path):
    with Harness(tmp_path) as h:
        commit = h.server.commit
        durable = commit.epoch
        commit.sync(durable)
        with failing_commits(h.server, once()):
            lost = commit.epoch
            storage_error(lambda: commit.sync(lost))
        commit.sync(commit.epoch)  # succeeds
        commit.sync(durable)  # a waiter on an epoch committed before the failure: answered
        storage_error(lambda: commit.sync(lost))
        with failing_commits(h.server, once()):  # a second failure, then a success
            again = commit.epoch
            storage_error(lambda: commit.sync(again))
        commit.sync(commit.epoch)
        storage_error(lambda: commit.sync(lost))
        storage_error(lambda: commit.sync(again))
        commit.sync(durable)


def test_rate_limited_requests_are_counted_from_the_durable_state_like_other_rejections(tmp_path):
    limits = {"rate_per_s": 0.001, "rate_burst": 1, "anonymous_rate_per_s": 0.001, "anonymous_burst": 1}
    with Harness(tmp_path, **limits) as h:
        server = h.server
        assert h.http.post("/v1/checkin", headers=h.auth("a")).status_code == 200
        assert h.http.post("/v1/checkin", headers=h.auth("a")).status_code == 429
        nope = {"Authorization": "Bearer afl_nope"}  # no valid token: the address's bucket
        assert [h.http.post("/v1/checkin", headers=nope).status_code for _ in range(2)] == [401, 429]
        assert server.status()["rejected"] == {"rate_limited": 2, "unauthorized": 1}
        with failing_commits(server, once()):  # the counts were not durable yet: a rollback forgets them
            storage_error(lambda: server.commit.sync(server.commit.epoch))
        fresh = FLServer(h.cfg, h.settings, tmp_path / "state")
        assert visible(server.status()) == visible(fresh.status())
        fresh.store.close()


def test_a_resend_waiting_on_a_rolled_back_answer_gets_503_then_counts_once(tmp_path):
    with Harness(tmp_path) as h:
        server, commit = h.server, h.server.commit
        body = h.frame(h.checkin("a"), key="key-of-a")
        real_sync, waiting, resent = commit.sync, threading.Event(), []

        def resend_sync(epoch):
            waiting.set()
            real_sync(epoch)

        def resend():
            resent.append(storage_error(lambda: server.upload("a", body)))

        resender = threading.Thread(target=resend)

        def fails():
            """Inside a's commit: its re-send arrives, finds a's answer in memory and waits
            for the commit, which then fails."""
            commit.sync = resend_sync
            resender.start()
            assert waiting.wait(10)
            commit.sync = real_sync
            return True

        with failing_commits(server, fails):
            storage_error(lambda: server.upload("a", body))
        resender.join(10)
        assert len(resent) == 1 and rows_of(server, "a", "key-of-a") == []
        status, answer = server.upload("a", body)
        assert status == 200 and "replayed" not in answer
        assert rows_of(server, "a", "key-of-a") == [(answer["seq"], "buffered")]


def test_failed_commits_during_a_burst_lose_or_double_count_no_acknowledged_update(tmp_path):
    """Six clients upload concurrently while a third of the commits fail; each client re-sends
    on 503 as the real one does. Every acknowledged update is in the log once, with the answer
    the client got, and after every rollback /status equals a restarted server's."""
    clients, trips = "abcdef", 6
    with Harness(
        tmp_path, {"name": "fedbuff", "buffer_size": 3}, {"mode": "async", "concurrency": 4}, max_update_norm=None
    ) as h:
        server = h.server
        rng = random.Random(1)
        lock = threading.Lock()
        compared = []
        real_rollback = server.commit.rollback

        def rollback_then_compare():
            real_rollback()
            if len(compared) < 3:  # a restarted server reads the same state: its /status is ours
                fresh = FLServer(h.cfg, h.settings, tmp_path / "state")
                compared.append((visible(server.status()), visible(fresh.status())))
                fresh.store.close()

        server.commit.rollback = rollback_then_compare

        def fails():
            with lock:
                return rng.random() < 0.35

        acked: dict[tuple[str, str], dict] = {}
        errors: list[BaseException] = []

        def trip(name, key):
            while not errors:
                try:
                    lease = server.checkin(name)
                except ApiError as err:
                    assert err.code == "storage_error", err
                    continue
                if lease["action"] == "train":
                    break
                threading.Event().wait(0.005)
            body = h.frame(lease, key=key)
            while not errors:
                try:
                    status, answer = server.upload(name, body)
                except ApiError as err:
                    assert err.code == "storage_error", err
                    continue
                assert status == 200, answer
                acked[(name, key)] = answer
                return

        def client(name):
            try:
                for n in range(trips):
                    trip(name, f"{name}-trip-{n}")
            except BaseException as err:
                errors.append(err)
                raise

        with failing_commits(server, fails):
            threads = [threading.Thread(target=client, args=(c,)) for c in clients]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=120)
        assert not errors and not any(t.is_alive() for t in threads)
        assert len(acked) == len(clients) * trips
        rolled_back = server.shared.counters.rejected["storage_error"]
        assert rolled_back > 0 and compared, "no commit failed while uploads were in flight"
        for mine, restarted in compared:
            assert mine == restarted

        rows = {
            (c, k): (seq, verdict)
            for c, k, seq, verdict in server.store.query("SELECT client, idem_key, seq, verdict FROM updates")
        }
        assert len(rows) == len(acked)
        for key, answer in acked.items():
            assert rows[key] == (answer["seq"], answer["verdict"])
        applied = [s for (ups,) in server.store.query("SELECT updates FROM versions") for s in json.loads(ups)]
        status = server.status()
        assert len(applied) == len(set(applied)) == 3 * status["version"]
        assert status["updates"]["buffered"] + status["updates"]["stepped"] == len(acked)
        assert status["buffer"]["fill"] == len(acked) - len(applied)
        final = visible(status)
    fresh = FLServer(h.cfg, h.settings, tmp_path / "state")
    again = visible(fresh.status())
    fresh.close()
    assert again == final
    print(f"burst with failing commits: {len(acked)} acknowledged updates, {rolled_back} answered 503 first")


def visible(status: dict) -> dict:
    """What /status reports about the run (not how long this process has been up)."""
    return {k: v for k, v in status.items() if k != "uptime_s"}
