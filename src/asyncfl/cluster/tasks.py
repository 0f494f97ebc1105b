"""Task admin: a task is one run of an experiment config, trained by the cluster. Adding one
writes everything the roles start from (the tasks row, its `concurrency` slots, model version 0
and the aggregator's initial state) in one transaction; tokens for its clients are minted into
the same database, hashed as the single-process server stores them (client tokens are also
signed, so selectors verify them without a lookup: tokens.py)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb

from asyncfl import config
from asyncfl.algorithms.aggregators import Aggregator, BufferedAggregator, FedAsync, QFedAvg, RobustAggregator
from asyncfl.algorithms.fednova import FedNova
from asyncfl.algorithms.private import PrivateAggregator
from asyncfl.build import build_aggregator, build_data, build_flat_model, num_users
from asyncfl.cluster.tokens import mint
from asyncfl.config import ConfigError, ExperimentConfig, RunSpec, ServerConfig
from asyncfl.models.flat import FlatModel
from asyncfl.server.auth import ANY_TASK, CLIENT, new_token
from asyncfl.server.service import fingerprint, require_served_sample_rate
from asyncfl.server.store import hash_token, tensor_bytes
from asyncfl.server.tsa_buffer import TsaServing, tsa_serving

SINGLE_PROCESS_ONLY = "runs in the single-process server only (`asyncfl serve` without --role)"
# what the cluster's aggregator folds: FedBuff's weighted sums (pre-summed by selectors); one
# update at a time, FedAsync, the robust FedBuff rules, q-FedAvg, FedNova and DP-FedBuff (each
# restored whole from its state_dict after a step). Kardam's filter is not among them: its
# per-client history changes on a refusal too, which no step would make durable. A subclass may
# fold differently.
CLUSTER_AGGREGATORS = (BufferedAggregator, FedAsync, RobustAggregator, QFedAvg, FedNova, PrivateAggregator)


@dataclass
class TaskObjects:
    """What a role builds from a task's config, the very objects the single process builds."""

    cfg: ExperimentConfig
    spec: RunSpec
    settings: ServerConfig
    data: object
    model: FlatModel
    aggregator: Aggregator
    tsa: TsaServing | None = None  # secure aggregation with the TSA: masked uploads, masked FedBuff


def tsa_buffer_terms(k: int) -> tuple[int, int]:
    """(most uploads in one masked partial, most in one buffer): a selector sums at most K
    uploads per partial, and the aggregator folds partials whole until a buffer holds K, so a
    buffer ends with at most 2K - 1; the ring's capacity (clients encode with it) is sized for that."""
    return k, 2 * k - 1


def build_objects(cfg: ExperimentConfig, run: str | None = None) -> TaskObjects:
    """The run's data, model and aggregator; ConfigError for a run the cluster cannot train."""
    spec = cfg.run(run)
    where = f"run {spec.name!r}"
    secure = spec.secure_aggregation
    if secure is not None and secure.protocol != "tsa":
        raise ConfigError(f"{where}: secure aggregation {secure.protocol!r} {SINGLE_PROCESS_ONLY}")
    if spec.scheduler.mode != "async":
        raise ConfigError(f"{where}: synchronous rounds (scheduler.mode {spec.scheduler.mode!r}) {SINGLE_PROCESS_ONLY}")
    if spec.privacy is not None and secure is not None:
        raise ConfigError(f"{where}: differential privacy with secure aggregation {SINGLE_PROCESS_ONLY}")
    require_served_sample_rate(spec)
    data = build_data(cfg)
    model = build_flat_model(cfg, data)
    settings = cfg.server
    if secure is not None:
        max_examples = settings.max_examples or int(data.client_sizes().max())
        _, per_buffer = tsa_buffer_terms(spec.algorithm.buffer_size)
        tsa = tsa_serving(spec, settings, model.numel, max_examples, per_buffer)
        return TaskObjects(cfg, spec, settings, data, model, tsa.aggregator, tsa)
    aggregator = build_aggregator(spec, cfg.trainer.lr, num_users=num_users(cfg, data), seed=cfg.seed)
    if type(aggregator) not in CLUSTER_AGGREGATORS:
        raise ConfigError(
            f"{where}: algorithm {spec.algorithm.name!r} ({type(aggregator).__name__}) {SINGLE_PROCESS_ONLY}; "
            "the cluster trains FedBuff (mean or robust rules, with or without differential privacy; no filter), "
            "FedAsync, q-FedAvg and FedNova"
        )
    return TaskObjects(cfg, spec, settings, data, model, aggregator)


def task_config(tree: dict) -> ExperimentConfig:
    """A tasks row's config back as the validated object (it was validated when added)."""
    return config.validate(tree)


def add_task(conn: psycopg.Connection, cfg: ExperimentConfig, run: str | None = None, task: str | None = None) -> str:
    """Validate the run, then write its task; the task's name (default: server.task, else the
    run's name). ConfigError when the name is taken."""
    objects = build_objects(cfg, run)
    spec = objects.spec
    name = task or cfg.server.task or spec.name
    w0 = objects.model.initial_weights()
    concurrency = spec.scheduler.concurrency
    with conn.transaction():
        cur = conn.execute(
            "INSERT INTO tasks(task, config, run, fingerprint, concurrency) VALUES (%s, %s, %s, %s, %s) "
            "ON CONFLICT (task) DO NOTHING",
            (name, Jsonb(cfg.model_dump(mode="json")), spec.name, fingerprint(cfg, spec.name, name), concurrency),
        )
        if cur.rowcount != 1:
            raise ConfigError(f"task {name!r} exists already; give another --task")
        with conn.cursor() as c:
            c.executemany("INSERT INTO slots(task, slot) VALUES (%s, %s)", [(name, i) for i in range(concurrency)])
        conn.execute(
            "INSERT INTO versions(task, version, updates, weights) VALUES (%s, 0, 0, %s)", (name, tensor_bytes(w0))
        )
        conn.execute(
            "INSERT INTO aggregator_state(task, version, body) VALUES (%s, 0, %s)",
            (name, tensor_bytes(objects.aggregator.state_dict())),
        )
    return name


def list_tasks(conn: psycopg.Connection) -> list[dict]:
    """Every task with its progress (version, latest test accuracy), owner and slot use, oldest first."""
    rows = conn.execute(
        "SELECT t.task, t.run, t.state, t.version, t.concurrency, t.owner, t.owner_epoch, "
        "(SELECT count(*) FROM slots s WHERE s.task = t.task AND s.lease_id IS NOT NULL), "
        "(SELECT e.accuracy FROM evals e WHERE e.task = t.task ORDER BY e.id DESC LIMIT 1) "
        "FROM tasks t ORDER BY t.created_at, t.task"
    ).fetchall()
    keys = ("task", "run", "state", "version", "concurrency", "owner", "owner_epoch", "leased", "accuracy")
    return [dict(zip(keys, r)) for r in rows]


def finish_task(conn: psycopg.Connection, task: str) -> bool:
    """Mark a task done: selectors stop leasing; uploads in flight still fold. False: no such task."""
    return conn.execute("UPDATE tasks SET state = 'done' WHERE task = %s", (task,)).rowcount == 1


def create_token(conn: psycopg.Connection, client: str, task: str, role: str = CLIENT) -> str:
    """A new token for `client` on `task` (ANY_TASK: an operator's for every task), stored
    hashed; the token itself is returned once and kept nowhere. Client tokens are signed."""
    return create_tokens(conn, [client], task, role)[0]


def create_tokens(conn: psycopg.Connection, clients: list[str], task: str, role: str = CLIENT) -> list[str]:
    """`create_token` for many clients in one COPY (10^5 tokens in about a second)."""
    if task != ANY_TASK and conn.execute("SELECT 1 FROM tasks WHERE task = %s", (task,)).fetchone() is None:
        raise ConfigError(f"no task {task!r} in this database (asyncfl cluster task list)")
    tokens = mint(conn, clients, task) if role == CLIENT else [new_token() for _ in clients]
    with conn.cursor() as cur, cur.copy("COPY tokens(hash, client, task, role) FROM STDIN") as copy:
        for token, client in zip(tokens, clients):
            copy.write_row((hash_token(token), client, task, role))
    return tokens
