"""Several tasks in one cluster, every role a real process: three tasks with different models
and algorithms (FedBuff on an MLP, FedAsync on a wider MLP, FedBuff with a robust rule and
server Adam on logistic regression) served at once by two selectors and two aggregators, real
`asyncfl client` processes with each task's tokens. Each task trains, only through its own
clients, within its own concurrency; both aggregators own tasks; kill -9 of the aggregator
that owns two hands both to the other, and in every task every acknowledged update is logged
once and lands in exactly one partial sum and at most one version."""

import json
import signal
import threading
import urllib.request

import pytest
from cluster_helpers import fetch
from test_cluster_e2e import Cluster, _healthy, _until

from asyncfl.cluster.members import session
from asyncfl.cluster.postgres import free_port
from asyncfl.cluster.tasks import add_task, create_token
from asyncfl.config import validate
from asyncfl.server.auth import ANY_TASK, OPERATOR

CLIENTS_PER_TASK = 2
TASKS = {  # task: (model, run, concurrency)
    "buff_mlp": ({"name": "mlp", "hidden": [16]}, {"name": "fedbuff", "buffer_size": 2}, 1),
    "async_wide": ({"name": "mlp", "hidden": [32]}, {"name": "fedasync", "alpha": 0.5}, 1),
    "robust_logreg": (
        {"name": "logreg"},
        {"name": "fedbuff", "buffer_size": 2, "aggregation": "median", "server_opt": {"name": "adam", "lr": 0.01}},
        2,
    ),
}


def experiment(task: str):
    model, algorithm, concurrency = TASKS[task]
    return validate(
        {
            "name": task,
            "seed": 0,
            "target_accuracy": 0.99,
            "data": {"num_clients": CLIENTS_PER_TASK, "partition": {"kind": "iid"}},
            "model": model,
            "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 2},
            "server": {"lease_timeout": 20, "eval_every_s": 2, "keep_versions": 1000, "rate_per_s": 100},
            "runs": [{"name": task, "algorithm": algorithm, "scheduler": {"concurrency": concurrency}}],
        }
    )


def _tasks(url) -> dict[str, tuple[str, int, int]]:
    """task: (owner, owner_epoch, version)."""
    return {t: (o, e, v) for t, o, e, v in fetch(url, "SELECT task, owner, owner_epoch, version FROM tasks")}


def _get(port, path, token):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=5) as r:
        return r.read().decode()


@pytest.mark.slow
def test_cluster_trains_three_tasks_and_moves_two_on_kill_9(pg_url, tmp_path):
    tokens = {}
    with session(pg_url) as conn:
        for task in TASKS:
            add_task(conn, experiment(task))
            tokens[task] = [create_token(conn, f"{task}-c{i}", task) for i in range(CLIENTS_PER_TASK)]
        operator = create_token(conn, "ops", ANY_TASK, OPERATOR)
        buff_operator = create_token(conn, "ops-buff", "buff_mlp", OPERATOR)
    cluster = Cluster(pg_url, tmp_path)
    most_leases, watching = dict.fromkeys(TASKS, 0), threading.Event()

    def watch():
        while not watching.wait(0.05):
            sql = "SELECT task, count(*) FROM leases WHERE state = 'active' GROUP BY task"
            for task, n in fetch(pg_url, sql):
                most_leases[task] = max(most_leases[task], n)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        aggregators = [cluster.role("aggregator"), cluster.role("aggregator")]
        # both alive before the coordinator places the tasks, so it spreads them 2 + 1
        _until(
            lambda: fetch(pg_url, "SELECT count(*) FROM members WHERE role = 'aggregator'")[0][0] == 2, "aggregators"
        )
        cluster.role("coordinator")
        ports = [free_port(), free_port()]
        for port in ports:
            cluster.role("selector", "--port", str(port))
        _until(lambda: all(_healthy(p) for p in ports), "the selectors")
        for t, task in enumerate(TASKS):
            # a client token names its task: the selector describes that task and no other
            assert json.loads(_get(ports[t % 2], "/v1/task", tokens[task][0]))["task"] == task
            for i, token in enumerate(tokens[task]):
                cluster.spawn(
                    f"{task}-client{i}",
                    *("client", "--server", f"http://127.0.0.1:{ports[(t + i) % 2]}", "--token", token),
                    *("--data", f"digits:client={i}", "--ack-log", str(tmp_path / f"acks-{task}-{i}.jsonl")),
                    *("--backoff-cap", "1"),
                )
        _until(lambda: all(v >= 3 for _, _, v in _tasks(pg_url).values()), "version 3 of every task")

        before = _tasks(pg_url)
        owners = [o for o, _, _ in before.values()]
        assert len(set(owners)) == 2  # both aggregators own a task
        busiest = max(set(owners), key=owners.count)
        moved = {t for t, (o, _, _) in before.items() if o == busiest}
        assert len(moved) == 2
        # every task's series on either selector, for an operator of every task; one task's only
        metrics = _get(ports[0], "/metrics", operator)
        for task in TASKS:
            assert f'asyncfl_model_version{{task="{task}"}}' in metrics
            assert f'asyncfl_checkins_total{{task="{task}",answer=' in metrics
        assert set(json.loads(_get(ports[1], "/status", operator))["tasks"]) == set(TASKS)
        assert set(json.loads(_get(ports[1], "/status", buff_operator))["tasks"]) == {"buff_mlp"}

        victim = next(p for p in aggregators if p.pid == int(busiest.split("-")[-2]))
        victim.send_signal(signal.SIGKILL)

        def taken_over():
            now = _tasks(pg_url)
            return all(now[t][0] not in (None, busiest) and now[t][1] > before[t][1] for t in moved)

        _until(taken_over, "the other aggregator to take both tasks over", timeout=60)
        after = _tasks(pg_url)
        _until(
            lambda: all(_tasks(pg_url)[t][2] >= after[t][2] + 2 for t in TASKS), "every task to go on after the kill"
        )
        assert len({o for o, _, _ in _tasks(pg_url).values()}) == 1
        cluster.stop_clients()
    finally:
        watching.set()
        watcher.join()
        cluster.stop()

    for task, (_, _, concurrency) in TASKS.items():
        assert 0 < most_leases[task] <= concurrency, task
        # with one slot, a task's client on the other selector may never train (nor log an ack)
        paths = [tmp_path / f"acks-{task}-{i}.jsonl" for i in range(CLIENTS_PER_TASK)]
        acks = [json.loads(line) for path in paths if path.exists() for line in open(path)]
        accepted = {a["key"] for a in acks if a["http"] == 200}
        assert len(accepted) >= 4, task
        logged = fetch(
            pg_url, "SELECT idem_key, partial_id, client FROM updates WHERE task = %s AND status = 200", task
        )
        assert accepted <= {key for key, _, _ in logged}, task  # every acknowledged update is in the log
        assert len(logged) == len({key for key, _, _ in logged}), task  # once
        assert {client for _, _, client in logged} <= {f"{task}-c{i}" for i in range(CLIENTS_PER_TASK)}
        in_partials = fetch(pg_url, "SELECT coalesce(sum(count), 0) FROM partials WHERE task = %s", task)[0][0]
        assert sum(1 for _, pid, _ in logged if pid is not None) == in_partials, task
        folded, waiting = fetch(
            pg_url,
            "SELECT coalesce(sum(count - discarded) FILTER (WHERE folded_version IS NOT NULL), 0), "
            "coalesce(sum(count) FILTER (WHERE folded_version IS NULL), 0) FROM partials WHERE task = %s",
            task,
        )[0]
        in_versions = fetch(pg_url, "SELECT coalesce(sum(updates), 0) FROM versions WHERE task = %s", task)[0][0]
        assert in_versions == folded, task  # each folded update in exactly one version
        buffer = TASKS[task][1].get("buffer_size", 1)
        assert waiting < buffer * CLIENTS_PER_TASK, task
    # no client trained a task other than its token's
    for client, task in fetch(pg_url, "SELECT DISTINCT client, task FROM updates"):
        assert client.startswith(f"{task}-c"), (client, task)
