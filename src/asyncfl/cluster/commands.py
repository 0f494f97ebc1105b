"""What the multi-process server's commands run (cli.py imports this only when one runs)."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import psycopg

from asyncfl.config import ConfigError

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
GIL_SWITCH_S = 0.0005  # a selector's: see _serve_selector


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
        return _serve_selector(args, url)
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


def _serve_selector(args, url: str) -> int:
    """HTTP on --host/--port (TLS with --ssl-certfile/--ssl-keyfile); the selector-wide settings
    (rate limits, connection limits) from --server-config, per-task ones from each task's config."""
    import yaml

    from asyncfl.cluster.selector import Selector
    from asyncfl.cluster.selector_app import create_selector_app
    from asyncfl.config import ServerConfig
    from asyncfl.server.limits import serve_http

    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ConfigError("give both --ssl-certfile and --ssl-keyfile for TLS")
    tree = yaml.safe_load(args.server_config.read_text()) if args.server_config else {}
    try:
        settings = ServerConfig.model_validate(tree or {})
    except ValueError as err:
        raise ConfigError(f"server config {args.server_config}: {err}") from None
    # check-ins answered on the event loop keep it busy, and a thread (a slot claim, an upload,
    # the refresh) waits for the GIL at each of its queries up to this long: Python's default,
    # 5 ms, starved uploads under a stream of check-ins (bench/server_scale.py: 22-31 updates/s
    # against 42-66 with 0.5 ms)
    sys.setswitchinterval(GIL_SWITCH_S)
    selector = Selector(url, settings)
    selector.address = f"{'https' if args.ssl_certfile else 'http'}://{args.host}:{args.port}"
    print(f"asyncfl selector {selector.id}: {selector.address}/", flush=True)
    serve_http(create_selector_app(selector), args, settings)
    return 0


def cluster(args) -> int:
    if args.cluster_command == "up":
        from asyncfl.cluster.up import up

        return up(args)
    from asyncfl.cluster.tasks import add_task, finish_task, list_tasks

    with _session(args) as conn:
        if args.task_command == "add":
            cfg = load_task_config(args)
            name = add_task(conn, cfg, args.run, args.task)
            print(f"task {name!r} added (run {cfg.run(args.run).name!r})")
        elif args.task_command == "finish":
            if not finish_task(conn, args.task):
                raise ConfigError(f"no task {args.task!r} in this database (asyncfl cluster task list)")
            print(f"task {args.task!r} done")
        else:
            print("task\trun\tstate\tversion\tleased/concurrency\towner (epoch)\taccuracy")
            for t in list_tasks(conn):
                accuracy = "-" if t["accuracy"] is None else f"{t['accuracy']:.4f}"
                print(
                    f"{t['task']}\t{t['run']}\t{t['state']}\t{t['version']}\t{t['leased']}/{t['concurrency']}\t"
                    f"{t['owner'] or '-'} ({t['owner_epoch']})\t{accuracy}"
                )
    return 0


def load_task_config(args, path=None):
    """The experiment at `path` (default: --config) with --set, --server-config and --seed applied."""
    from asyncfl.server.settings import load_serve_config

    cfg, _ = load_serve_config(path or args.config, args.overrides, args.server_config, args.seed)
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


def token_revoke(args) -> int:
    """`asyncfl token revoke --database-url URL --client NAME`: every token of the client issued
    until now, signed ones included; selectors refuse them within a refresh."""
    from asyncfl.cluster.tokens import revoke_client

    with _session(args) as conn:
        stored = revoke_client(conn, args.client)
    print(f"revoked {stored} token(s) of {args.client}")
    return 0


def token_rotate_key(args) -> int:
    """`asyncfl token rotate-key --database-url URL [--retire-old]`."""
    from asyncfl.cluster.tokens import add_signing_key, retire_signing_keys, signing_key

    with _session(args) as conn:
        add_signing_key(conn)
        retired = retire_signing_keys(conn) if args.retire_old else 0
        key_id, _ = signing_key(conn)
    print(f"signing key {key_id} signs new tokens; {retired} older key(s) retired")
    return 0
