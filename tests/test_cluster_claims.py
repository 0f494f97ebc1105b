"""A selector's slot claims, batched: the claims that arrive together go in one statement, never
more leases than the selector's free slots, one lease per client even when two selectors race
for it, and a database that is away answers every claim of the batch with a 503."""

from __future__ import annotations

import asyncio

import psycopg
import pytest
from cluster_helpers import FEDBUFF, experiment, fetch

from asyncfl.cluster.async_pool import AsyncPool
from asyncfl.cluster.claims import ClaimBatcher
from asyncfl.cluster.members import session
from asyncfl.cluster.tasks import add_task
from asyncfl.server.errors import ApiError

TASK = FEDBUFF["name"]  # 8 slots


@pytest.fixture
def url(pg_url):
    with session(pg_url) as conn:
        add_task(conn, experiment(FEDBUFF))
    return pg_url


def grant(url: str, selector: str, slots: list[int]) -> None:
    with session(url) as conn:
        conn.execute("UPDATE slots SET selector=%s WHERE task=%s AND slot = ANY(%s)", (selector, TASK, slots))


class Spy(ClaimBatcher):
    """Records the clients of every statement it sends."""

    def __init__(self, url: str, selector: str, **kw):
        super().__init__(AsyncPool(url), selector, **kw)
        self.statements: list[list[str]] = []

    async def _statement(self, params):
        self.statements.append(list(params[1]))
        return await super()._statement(params)


async def lock_wait(url: str, statement: str, timeout_s: float = 30.0) -> None:
    """Until a backend running `statement` waits for a lock."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        waiting = fetch(
            url,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE %s",
            f"%{statement}%",
        )
        if waiting[0][0]:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no backend running {statement} waited for a lock within {timeout_s} s")


def claim_all(batcher: ClaimBatcher, clients: list[str]) -> list[tuple]:
    async def scenario():
        try:
            return await asyncio.gather(*(batcher.claim(TASK, c, None, 60.0) for c in clients))
        finally:
            await batcher.close()

    return asyncio.run(scenario())


def test_claims_arriving_together_go_in_one_statement_and_lease_only_the_free_slots(url):
    grant(url, "sel-a", [0, 1, 2, 3])
    spy = Spy(url, "sel-a")
    clients = [f"c{i}" for i in range(10)]
    rows = claim_all(spy, clients)
    assert spy.statements == [clients]  # one round trip, one commit
    outcomes = [row[0] for row in rows]
    assert outcomes == ["leased"] * 4 + ["full"] * 6  # in arrival order
    assert sorted(row[3] for row in rows[:4]) == [1, 2, 3, 4]  # trips counted once each
    assert all(row[5] == 0 for row in rows[4:])  # none of sel-a's slots free
    leases = fetch(url, "SELECT client, lease_id FROM leases WHERE state='active' ORDER BY client")
    assert leases == sorted((c, row[1]) for c, row in zip(clients[:4], rows[:4], strict=True))
    held = fetch(url, "SELECT lease_id FROM slots WHERE selector='sel-a' AND lease_id IS NOT NULL")
    assert sorted(x for (x,) in held) == sorted(row[1] for row in rows[:4])
    assert fetch(url, "SELECT issued FROM tasks WHERE task=%s", TASK) == [(4,)]


def test_a_batch_holds_at_most_max_batch_claims_and_each_claim_gets_its_own_row(url):
    grant(url, "sel-a", [0, 1, 2, 3, 4, 5, 6, 7])
    spy = Spy(url, "sel-a", max_batch=3)
    clients = [f"c{i}" for i in range(7)] + ["c0"]  # c0 twice: its lease both times
    rows = claim_all(spy, clients)
    assert [len(s) for s in spy.statements] == [3, 3, 2]
    assert [row[0] for row in rows] == ["leased"] * 7 + ["held"]
    assert rows[-1][1:4] == rows[0][1:4]  # the same lease, version and trip
    assert len({row[1] for row in rows}) == 7


def test_two_selectors_racing_for_one_client_give_it_one_lease(url):
    """sel-b's claim for x is in flight (uncommitted) when sel-a's batch claims x: sel-a's insert
    fails on the one-active-lease index once sel-b commits, and the batch, sent again, finds
    sel-b's lease."""
    grant(url, "sel-a", [0, 1])
    grant(url, "sel-b", [2, 3])
    spy = Spy(url, "sel-a")

    async def scenario():
        with psycopg.connect(url) as other:  # a transaction of its own, left open
            (b_lease,) = other.execute(
                "SELECT lease_id FROM asyncfl_claim(%s, 'x', 'sel-b', NULL, 60, 'bbbbbb')", (TASK,)
            ).fetchone()
            racing = asyncio.ensure_future(spy.claim(TASK, "x", None, 60.0))
            await lock_wait(url, "asyncfl_claim_many")  # sel-a's batch waits for the task's row
            assert not racing.done()
            other.commit()
        try:
            return b_lease, await asyncio.wait_for(racing, 10)
        finally:
            await spy.close()

    b_lease, row = asyncio.run(scenario())
    assert row[:2] == ("held", b_lease)
    assert spy.statements == [["x"], ["x"]]  # the batch was sent again
    assert fetch(url, "SELECT client, lease_id FROM leases WHERE state='active'") == [("x", b_lease)]
    assert fetch(url, "SELECT count(*) FROM slots WHERE selector='sel-a' AND lease_id IS NOT NULL") == [(0,)]


def test_a_database_away_refuses_every_claim_of_the_batch_and_claims_resume_after(url):
    grant(url, "sel-a", [0, 1, 2])
    name = psycopg.conninfo.conninfo_to_dict(url)["dbname"]
    admin = psycopg.conninfo.make_conninfo(url, dbname="postgres")
    batcher = ClaimBatcher(AsyncPool(url, wait_s=1.0), "sel-a")

    async def scenario():
        try:
            assert (await batcher.claim(TASK, "a", None, 60.0))[0] == "leased"  # a connection is open
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=%s", (name,))
            try:
                refused = await asyncio.gather(
                    *(batcher.claim(TASK, c, None, 60.0) for c in "bc"), return_exceptions=True
                )
            finally:
                with psycopg.connect(admin, autocommit=True) as conn:
                    conn.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            again = await asyncio.gather(*(batcher.claim(TASK, c, None, 60.0) for c in "bc"))
            return refused, again
        finally:
            await batcher.close()

    refused, again = asyncio.run(scenario())
    for err in refused:
        assert isinstance(err, ApiError) and err.status == 503 and "Retry-After" in err.headers
    assert [row[0] for row in again] == ["leased", "leased"]
    assert fetch(url, "SELECT count(*) FROM leases WHERE state='active'") == [(3,)]


def test_a_claim_cancelled_before_its_batch_is_sent_takes_no_slot(url):
    grant(url, "sel-a", [0, 1, 2])
    spy = Spy(url, "sel-a", max_batch=1)

    async def scenario():
        try:
            first = asyncio.ensure_future(spy.claim(TASK, "a", None, 60.0))
            second = asyncio.ensure_future(spy.claim(TASK, "b", None, 60.0))
            await asyncio.sleep(0)  # both waiting; "a" goes first, alone
            second.cancel()
            return await first
        finally:
            await spy.close()

    assert asyncio.run(scenario())[0] == "leased"
    assert spy.statements == [["a"]]
    assert fetch(url, "SELECT client FROM leases") == [("a",)]
