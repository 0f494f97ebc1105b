"""The aggregator role against a real PostgreSQL: folding partials gives the single process's
model, a takeover re-folds what was buffered exactly once, and a fenced-out commit changes nothing."""

import json

import pytest
import torch
from cluster_helpers import FEDASYNC, FEDBUFF_ADAM, experiment, fetch, insert_partial, updates

from asyncfl.algorithms.types import ServerState, Verdict
from asyncfl.cluster.aggregator import AggregatorRole, Fenced, OwnedTask
from asyncfl.cluster.members import session
from asyncfl.cluster.partials import Partial, empty
from asyncfl.cluster.tasks import add_task, build_objects, list_tasks
from asyncfl.server.store import tensor_load


def _assign(url, task, member, epoch):
    with session(url) as conn:
        conn.execute("UPDATE tasks SET owner = %s, owner_epoch = %s WHERE task = %s", (member, epoch, task))


def _summed(aggregator, batch, staleness):
    p = empty()
    for u in batch:
        p.add(aggregator, u, staleness)
    return p


def _weights(url, task, version):
    return tensor_load(
        bytes(fetch(url, "SELECT weights FROM versions WHERE task = %s AND version = %s", task, version)[0][0])
    )


def _single_process(cfg, run, ups, versions_at_arrival):
    """The reference: the run's own aggregator, as the single process builds it, one update at a time."""
    objects = build_objects(cfg, run)
    state = ServerState(w=objects.model.initial_weights(), version=0)
    models = {0: state.w}
    for u, v in zip(ups, versions_at_arrival):
        assert state.version == v
        if objects.aggregator.submit(state, u, models[u.base_version]) == Verdict.STEPPED:
            models[state.version] = state.w
    return state


def test_summed_partials_give_the_single_process_model(pg_url):
    """FedBuff (K=3) with server Adam: 6 updates in partials of 2+1 (staleness 0) and 3
    (staleness 1) step twice, to the model the single process reaches one update at a time."""
    cfg = experiment(FEDBUFF_ADAM)
    with session(pg_url) as conn:
        add_task(conn, cfg)
    objects = build_objects(cfg)
    ups = updates(6, objects.model.numel)
    ref = _single_process(cfg, None, ups, [0, 0, 0, 1, 1, 1])
    agg = objects.aggregator
    ids = [
        insert_partial(pg_url, "fedbuff_adam", _summed(agg, ups[0:2], 0)),
        insert_partial(pg_url, "fedbuff_adam", _summed(agg, ups[2:3], 0)),
        insert_partial(pg_url, "fedbuff_adam", _summed(agg, ups[3:6], 1)),
    ]
    role = AggregatorRole(pg_url)
    _assign(pg_url, "fedbuff_adam", role.member, 1)
    assert role.round() == 3
    assert fetch(pg_url, "SELECT version FROM tasks") == [(2,)]
    assert ref.version == 2 and torch.allclose(_weights(pg_url, "fedbuff_adam", 2), ref.w, atol=1e-7)
    assert fetch(pg_url, "SELECT id, folded_version, discarded FROM partials ORDER BY id") == [
        (ids[0], 1, 0),
        (ids[1], 1, 0),
        (ids[2], 2, 0),
    ]
    assert fetch(pg_url, "SELECT version, updates FROM versions ORDER BY version") == [(0, 0), (1, 3), (2, 3)]
    (state,) = fetch(pg_url, "SELECT body FROM aggregator_state WHERE version = 2")[0]
    assert tensor_load(bytes(state))["count"] == 0


def test_single_updates_fold_in_id_order_like_the_single_process(pg_url):
    """FedAsync: each partial one update, each a step, base models read back from versions."""
    cfg = experiment(FEDASYNC)
    with session(pg_url) as conn:
        add_task(conn, cfg)
    ups = updates(3, build_objects(cfg).model.numel)
    ups[2].base_version = 1  # started from version 1, arrives at version 2: staleness 1
    ref = _single_process(cfg, None, ups, [0, 1, 2])
    for u in ups:
        insert_partial(pg_url, "fedasync", Partial.single(u, 0))
    role = AggregatorRole(pg_url)
    _assign(pg_url, "fedasync", role.member, 1)
    role.round()
    assert fetch(pg_url, "SELECT version FROM tasks") == [(3,)]
    assert torch.allclose(_weights(pg_url, "fedasync", 3), ref.w, atol=1e-7)
    assert fetch(pg_url, "SELECT folded_version FROM partials ORDER BY id") == [(1,), (2,), (3,)]


def test_takeover_refolds_the_buffered_partials_exactly_once(pg_url):
    cfg = experiment(FEDBUFF_ADAM)
    with session(pg_url) as conn:
        add_task(conn, cfg)
    objects = build_objects(cfg)
    ups = updates(3, objects.model.numel)
    ref = _single_process(cfg, None, ups, [0, 0, 0])
    insert_partial(pg_url, "fedbuff_adam", _summed(objects.aggregator, ups[0:2], 0))
    first = AggregatorRole(pg_url)
    _assign(pg_url, "fedbuff_adam", first.member, 1)
    first.round()
    assert first.tasks["fedbuff_adam"].aggregator.count == 2  # buffered, not stepped: still waiting in the DB
    assert fetch(pg_url, "SELECT folded_version FROM partials") == [(None,)]
    second = AggregatorRole(pg_url)  # the first one dies (kill -9): the coordinator moves its task
    _assign(pg_url, "fedbuff_adam", second.member, 2)
    insert_partial(pg_url, "fedbuff_adam", _summed(objects.aggregator, ups[2:3], 0))
    second.round()
    first.round()  # back from a pause: sees the task is no longer its own and drops it
    assert "fedbuff_adam" not in first.tasks
    assert fetch(pg_url, "SELECT version FROM tasks") == [(1,)]
    assert torch.allclose(_weights(pg_url, "fedbuff_adam", 1), ref.w, atol=1e-7)
    assert fetch(pg_url, "SELECT sum(count - discarded) FROM partials WHERE folded_version = 1") == [(3,)]
    assert fetch(pg_url, "SELECT updates FROM versions WHERE version = 1") == [(3,)]


def test_a_fenced_out_commit_changes_nothing(pg_url):
    cfg = experiment(FEDBUFF_ADAM)
    with session(pg_url) as conn:
        add_task(conn, cfg)
        stale = OwnedTask(conn, "agg-old", "fedbuff_adam", 1)
    objects = build_objects(cfg)
    insert_partial(pg_url, "fedbuff_adam", _summed(objects.aggregator, updates(3, objects.model.numel), 0))
    _assign(pg_url, "fedbuff_adam", "agg-old", 1)
    _assign(pg_url, "fedbuff_adam", "agg-new", 2)  # reassigned while the old one was paused
    with session(pg_url) as conn:
        stale.conn = conn
        with pytest.raises(Fenced):
            stale.poll()  # its step would make version 1
    assert fetch(pg_url, "SELECT version, owner, owner_epoch FROM tasks") == [(0, "agg-new", 2)]
    assert fetch(pg_url, "SELECT version FROM versions") == [(0,)]
    assert fetch(pg_url, "SELECT folded_version FROM partials") == [(None,)]
    assert fetch(pg_url, "SELECT version FROM aggregator_state") == [(0,)]


def test_old_versions_are_pruned_unless_a_lease_starts_from_them(pg_url):
    cfg = experiment(FEDASYNC, server={"keep_versions": 2})
    with session(pg_url) as conn:
        add_task(conn, cfg)
        conn.execute(
            "INSERT INTO leases(lease_id, task, client, base_version, trip, expires_at) "
            "VALUES ('L', 'fedasync', 'c', 0, 1, now() + interval '1 minute')"
        )
    for u in updates(5, build_objects(cfg).model.numel):
        u.base_version = 0
        insert_partial(pg_url, "fedasync", Partial.single(u, 0))
    role = AggregatorRole(pg_url)
    _assign(pg_url, "fedasync", role.member, 1)
    role.round()
    assert fetch(pg_url, "SELECT version FROM versions ORDER BY version") == [(0,), (4,), (5,)]


def test_a_non_finite_step_is_refused_and_its_updates_discarded(pg_url):
    """A sum that overflowed: the step is refused as the single process refuses it, the model and
    the aggregator's state stay as they were, and the next buffer steps from them."""
    cfg = experiment(FEDBUFF_ADAM)
    with session(pg_url) as conn:
        add_task(conn, cfg)
    objects = build_objects(cfg)
    numel = objects.model.numel
    bad = insert_partial(
        pg_url, "fedbuff_adam", Partial(count=3, weight_sum=3.0, total=torch.full((numel,), torch.inf))
    )
    ups = updates(3, numel)
    good = insert_partial(pg_url, "fedbuff_adam", _summed(objects.aggregator, ups, 0))
    role = AggregatorRole(pg_url)
    _assign(pg_url, "fedbuff_adam", role.member, 1)
    role.round()
    assert fetch(pg_url, "SELECT id, folded_version, discarded FROM partials ORDER BY id") == [
        (bad, 0, 3),
        (good, 1, 0),
    ]
    ref = _single_process(cfg, None, ups, [0, 0, 0])
    assert torch.allclose(_weights(pg_url, "fedbuff_adam", 1), ref.w, atol=1e-7)


def test_reaching_the_target_ends_the_task(pg_url):
    cfg = experiment(FEDASYNC, target_accuracy=0.01, stop={"at_target": True})
    with session(pg_url) as conn:
        add_task(conn, cfg)
    role = AggregatorRole(pg_url)
    _assign(pg_url, "fedasync", role.member, 1)
    role.round()  # the first evaluation is due at once
    ((version, accuracy),) = fetch(pg_url, "SELECT version, accuracy FROM evals")
    assert version == 0 and accuracy >= 0.01
    assert fetch(pg_url, "SELECT state FROM tasks") == [("done",)]
    with session(pg_url) as conn:
        assert list_tasks(conn)[0]["accuracy"] == accuracy


ONE_AT_A_TIME = {
    "qfedavg": {"algorithm": {"name": "qfedavg", "q": 1.0, "buffer_size": 3}},
    "fednova": {"algorithm": {"name": "fednova", "buffer_size": 3, "server_opt": {"name": "sgd", "lr": 1.0}}},
    "dp_fedbuff": {
        "algorithm": {"name": "fedbuff", "buffer_size": 3},
        "privacy": {
            "clip_norm": 0.05,
            "noise_multiplier": 1.0,
            "sample_rate": 0.1,
            "adaptive": {"target_quantile": 0.5, "count_noise_std": 2.0},
        },
    },
}


@pytest.mark.parametrize("name", sorted(ONE_AT_A_TIME))
def test_one_update_rules_step_like_the_single_process_across_a_takeover(pg_url, name):
    """q-FedAvg, FedNova and DP-FedBuff (noise, adaptive clipping): single partials folded by one
    aggregator, which dies with one update buffered; the next one resumes from the durable step
    and reaches the single process's model, noise stream, clip norm and epsilon."""
    cfg = experiment({"name": name, "scheduler": {"mode": "async", "concurrency": 6}} | ONE_AT_A_TIME[name])
    with session(pg_url) as conn:
        add_task(conn, cfg)
    ups = updates(9, build_objects(cfg).model.numel)
    for i, u in enumerate(ups):
        u.start_loss, u.steps, u.planned_steps = 0.5 + 0.1 * i, 1 + i % 3, 3
    reference = build_objects(cfg).aggregator
    state = ServerState(w=build_objects(cfg).model.initial_weights(), version=0)
    w0 = state.w
    for u in ups:
        reference.submit(state, u, w0)
    assert state.version == 3
    for u in ups[:4]:
        insert_partial(pg_url, name, Partial.single(u, 0))
    first = AggregatorRole(pg_url)
    _assign(pg_url, name, first.member, 1)
    first.round()
    assert fetch(pg_url, "SELECT version FROM tasks") == [(1,)]
    assert first.tasks[name].aggregator.count == 1  # the fourth, buffered in memory only
    second = AggregatorRole(pg_url)  # the first is killed: the coordinator moves the task
    _assign(pg_url, name, second.member, 2)
    for u in ups[4:]:
        insert_partial(pg_url, name, Partial.single(u, 0))
    second.round()
    assert fetch(pg_url, "SELECT version FROM tasks") == [(3,)]
    assert torch.allclose(_weights(pg_url, name, 3), state.w, atol=1e-6)
    assert fetch(pg_url, "SELECT sum(count) FROM partials WHERE folded_version IS NOT NULL") == [(9,)]
    (report,) = fetch(pg_url, "SELECT report FROM aggregator_state WHERE task = %s", name)[0]
    if name == "dp_fedbuff":
        privacy = json.loads(report)["privacy"]
        assert privacy["privacy_steps"] == 3 and privacy["epsilon"] == pytest.approx(reference.epsilon())
        assert privacy["clip_norm"] == pytest.approx(reference.clip_norm) and reference.clip_norm != 0.05
