"""The coordinator's rounds against a real PostgreSQL: lease expiry, slot grants, task placement."""

from collections import Counter

from cluster_helpers import FEDASYNC, FEDBUFF, FEDBUFF_ADAM, experiment, fetch

from asyncfl.cluster import members
from asyncfl.cluster.aggregator import AggregatorRole
from asyncfl.cluster.coordinator import Coordinator
from asyncfl.cluster.members import session
from asyncfl.cluster.tasks import add_task


def _beat(url, *ids, role="selector"):
    with session(url) as conn:
        for m in ids:
            members.heartbeat(conn, m, role)


def _kill(url, member):
    """As if it stopped heartbeating an hour ago (its row stays, as after kill -9)."""
    with session(url) as conn:
        conn.execute("UPDATE members SET heartbeat_at = now() - interval '1 hour' WHERE id = %s", (member,))


def _holdings(url, task="fedbuff"):
    return Counter(dict(fetch(url, "SELECT selector, count(*) FROM slots WHERE task = %s GROUP BY selector", task)))


def _lease(url, slot, lease_id, expires="now() + interval '1 minute'", task="fedbuff"):
    with session(url) as conn, conn.transaction():
        conn.execute(
            f"INSERT INTO leases(lease_id, task, client, base_version, trip, expires_at) "
            f"VALUES (%s, %s, %s, 0, 1, {expires})",
            (lease_id, task, f"client-{lease_id}"),
        )
        conn.execute("UPDATE slots SET lease_id = %s WHERE task = %s AND slot = %s", (lease_id, task, slot))


def test_slots_are_dealt_to_live_selectors_and_a_dead_ones_free_slots_move(pg_url):
    with session(pg_url) as conn:
        add_task(conn, experiment(FEDBUFF))
    _beat(pg_url, "sel-a", "sel-b")
    coord = Coordinator(pg_url)
    coord.tick()
    assert _holdings(pg_url) == {"sel-a": 4, "sel-b": 4}
    b_slots = [s for (s,) in fetch(pg_url, "SELECT slot FROM slots WHERE selector = 'sel-b' ORDER BY slot")]
    _lease(pg_url, b_slots[0], "L1")  # sel-b has a client in flight when it dies
    _kill(pg_url, "sel-b")
    coord.tick()
    assert _holdings(pg_url) == {"sel-a": 7, "sel-b": 1}  # the leased slot stays until its lease ends
    assert sum(_holdings(pg_url).values()) == 8  # never more slots than the concurrency
    with session(pg_url) as conn, conn.transaction():
        conn.execute("UPDATE leases SET state = 'done' WHERE lease_id = 'L1'")
        conn.execute("UPDATE slots SET lease_id = NULL WHERE lease_id = 'L1'")
    coord.tick()
    assert _holdings(pg_url) == {"sel-a": 8}


def test_expired_leases_free_their_slots(pg_url):
    with session(pg_url) as conn:
        add_task(conn, experiment(FEDBUFF))
    _lease(pg_url, 0, "old", expires="now() - interval '1 second'")
    _lease(pg_url, 1, "fresh")
    change_before = fetch(pg_url, "SELECT change FROM leases WHERE lease_id = 'old'")[0][0]
    assert Coordinator(pg_url).tick()["expired"] == 1
    assert fetch(pg_url, "SELECT lease_id, state FROM leases ORDER BY lease_id") == [
        ("fresh", "active"),
        ("old", "expired"),
    ]
    assert fetch(pg_url, "SELECT change FROM leases WHERE lease_id = 'old'")[0][0] > change_before
    assert fetch(pg_url, "SELECT slot FROM slots WHERE lease_id IS NOT NULL") == [(1,)]


def test_a_dead_aggregators_task_moves_with_a_new_epoch(pg_url):
    with session(pg_url) as conn:
        add_task(conn, experiment(FEDBUFF))
    _beat(pg_url, "agg-a", role="aggregator")
    coord = Coordinator(pg_url)
    coord.tick()
    assert fetch(pg_url, "SELECT owner, owner_epoch FROM tasks") == [("agg-a", 1)]
    _beat(pg_url, "agg-b", role="aggregator")
    coord.tick()
    assert fetch(pg_url, "SELECT owner, owner_epoch FROM tasks") == [("agg-a", 1)]  # a live owner keeps it
    _kill(pg_url, "agg-a")
    coord.tick()
    assert fetch(pg_url, "SELECT owner, owner_epoch FROM tasks") == [("agg-b", 2)]


def test_only_one_of_two_coordinators_acts(pg_url):
    with session(pg_url) as conn:
        add_task(conn, experiment(FEDBUFF))
    _beat(pg_url, "agg-a", role="aggregator")
    first, second = Coordinator(pg_url), Coordinator(pg_url)
    assert first.tick() != {} and first.leader
    assert second.tick() == {} and not second.leader
    first.conn.close()  # the leader dies: its lock goes with its connection
    assert second.tick() != {} and second.leader
    assert {m for (m,) in fetch(pg_url, "SELECT id FROM members WHERE role = 'coordinator'")} == {
        first.member,
        second.member,
    }


def test_three_tasks_over_two_aggregators(pg_url):
    """Different models and algorithms; both aggregators get tasks and build them."""
    with session(pg_url) as conn:
        add_task(conn, experiment(FEDBUFF))
        add_task(conn, experiment(FEDASYNC, hidden=8))
        add_task(conn, experiment(FEDBUFF_ADAM, hidden=24))
    roles = [AggregatorRole(pg_url), AggregatorRole(pg_url)]
    roles[0].round()  # the first aggregator is alone at first: it gets every task
    coord = Coordinator(pg_url)
    coord.tick()
    assert len(roles[0].tasks) == 0 and Counter(o for (o,) in fetch(pg_url, "SELECT owner FROM tasks")) == {
        roles[0].member: 3
    }
    roles[1].round()
    coord.tick()  # one task moves to the new aggregator
    for role in roles:
        role.round()
    owned = [sorted(role.tasks) for role in roles]
    assert sorted(map(len, owned)) == [1, 2]
    assert sorted(sum(owned, [])) == ["fedasync", "fedbuff", "fedbuff_adam"]
    numel = {name: t.state.w.numel() for role in roles for name, t in role.tasks.items()}
    assert len(set(numel.values())) == 3  # three different models
