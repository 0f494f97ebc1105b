"""What the multi-process server's commands run (cli.py imports this only when one runs)."""

from __future__ import annotations

import logging
import signal
import threading

import psycopg

from asyncfl.config import ConfigError

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def log_level(name: str) -> int:
    """A level by `serve --log-level`'s names (uvicorn's, whose 'trace' is below debug)."""
    return 5 if name == "trace" else logging.getLevelNamesMapping()[name.upper()]


def _database_url(args) -> str:
    if not args.database_url:
        raise ConfigError("give --database-url (or set $ASYNCFL_DATABASE_URL)")
    return args.database_url


def _session(args):
    from asyncfl.cluster.members import session

    try:
        return session(_database_url(args))
    except psycopg.OperationalError as err:
        raise ConfigError(f"cannot reach the database: {str(err).strip()}") from None


def _stop_on_signals() -> threading.Event:
    """Set on SIGTERM or Ctrl-C, so a role finishes its round and leaves cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def serve_role(args) -> int:
    """`asyncfl serve --role coordinator|aggregator|selector --database-url URL`."""
    import torch

    from asyncfl.cluster.db import check_schema
    from asyncfl.cluster.members import Timing

    torch.set_num_threads(1)
    logging.basicConfig(level=log_level(args.log_level), format=LOG_FORMAT)
    url = _database_url(args)
    with _session(args) as conn:
        check_schema(conn)
    if args.role == "selector":
        from asyncfl.cluster.selector_app import serve_selector

        return serve_selector(args)
    timing = Timing(member_timeout_s=args.member_timeout)
    if args.role == "coordinator":
        from asyncfl.cluster.coordinator import Coordinator

        role = Coordinator(url, timing=timing)
    else:
        from asyncfl.cluster.aggregator import AggregatorRole

        role = AggregatorRole(url, timing=timing)
    print(f"asyncfl {args.role} {role.member}", flush=True)
    role.run(_stop_on_signals())
    return 0


def cluster(args) -> int:
    if args.cluster_command == "up":
        from asyncfl.cluster.up import up

        return up(args)
    from asyncfl.cluster.tasks import add_task, list_tasks

    with _session(args) as conn:
        if args.task_command == "add":
            cfg = load_task_config(args)
            name = add_task(conn, cfg, args.run, args.task)
            print(f"task {name!r} added (run {cfg.run(args.run).name!r})")
        else:
            print("task\trun\tstate\tversion\tleased/concurrency\towner (epoch)")
            for t in list_tasks(conn):
                print(
                    f"{t['task']}\t{t['run']}\t{t['state']}\t{t['version']}\t{t['leased']}/{t['concurrency']}\t"
                    f"{t['owner'] or '-'} ({t['owner_epoch']})"
                )
    return 0


def load_task_config(args):
    from asyncfl.server.settings import load_serve_config

    cfg, _ = load_serve_config(args.config, args.overrides, args.server_config, args.seed)
    return cfg


def token_create(args) -> int:
    """`asyncfl token create --database-url URL --task T --client NAME [--operator]`."""
    from asyncfl.cluster.tasks import create_token
    from asyncfl.server.auth import ANY_TASK, CLIENT, OPERATOR

    if args.task is None and not args.operator:
        raise ConfigError("a client token needs --task")
    with _session(args) as conn:
        print(create_token(conn, args.client, args.task or ANY_TASK, OPERATOR if args.operator else CLIENT))
    return 0
