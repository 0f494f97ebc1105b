"""`asyncfl cluster up`: a whole cluster on one machine, for trying it out and for tests.

A throwaway PostgreSQL (`LocalPostgres`) unless --database-url names one; the schema migrated;
each --config's task added (kept when a task of that name exists); each task's client tokens
minted into its own file (a token names its task, so a client trains only that one); then
every role as a child process of this one, aggregators and the coordinator first, selectors on
consecutive ports. Their output is printed line by line behind the role's name. Ctrl-C or
SIGTERM stops the selectors first (no new uploads), then the coordinator and the aggregators,
and removes the local PostgreSQL; so does any role that exits on its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from asyncfl.cluster.arguments import DATABASE_URL_ENV
from asyncfl.config import ConfigError

STOP_TIMEOUT_S = 10.0


@dataclass
class Child:
    name: str
    process: subprocess.Popen


def role_command(role: str, log_level: str, *extra: str) -> list[str]:
    """A role's command line; the database URL travels in the environment (not in `ps`)."""
    return [sys.executable, "-m", "asyncfl.cli", "serve", "--role", role, "--log-level", log_level, *extra]


def _relay(child: Child, lock: threading.Lock) -> None:
    for line in child.process.stdout:
        with lock:
            sys.stdout.write(f"{child.name:>13} | {line}")
            sys.stdout.flush()


def start_children(url: str, args) -> list[Child]:
    env = os.environ | {DATABASE_URL_ENV: url, "PYTHONUNBUFFERED": "1"}
    plan = [(f"aggregator-{i + 1}", role_command("aggregator", args.log_level)) for i in range(args.aggregators)]
    plan.append(("coordinator", role_command("coordinator", args.log_level)))
    plan += [
        (
            f"selector-{i + 1}",
            role_command("selector", args.log_level, "--host", args.host, "--port", str(args.port + i)),
        )
        for i in range(args.selectors)
    ]
    children, lock = [], threading.Lock()
    for name, command in plan:
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        child = Child(name, process)
        threading.Thread(target=_relay, args=(child, lock), daemon=True).start()
        children.append(child)
    return children


def stop_children(children: list[Child]) -> None:
    """Selectors first (started last), then the others; SIGKILL after STOP_TIMEOUT_S."""
    for child in reversed(children):
        if child.process.poll() is None:
            child.process.terminate()
            try:
                child.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()


def tokens_path(tokens_file: Path, task: str, several: bool) -> Path:
    """Where a task's tokens go: --tokens-file itself for a single task, else STEM-TASK.SUFFIX."""
    return tokens_file.with_name(f"{tokens_file.stem}-{task}{tokens_file.suffix}") if several else tokens_file


def planned_tasks(args) -> list[tuple[str, object]]:
    """(task name, config) for every --config; ConfigError when two would share a name."""
    from asyncfl.cluster.commands import load_task_config

    if args.task is not None and len(args.config) > 1:
        raise ConfigError("--task names a single task; with several --config, name each by its server.task")
    plan: list[tuple[str, object]] = []
    for path in args.config:
        cfg = load_task_config(args, path)
        name = args.task or cfg.server.task or cfg.run(args.run).name
        if name in (n for n, _ in plan):
            raise ConfigError(f"two configs make task {name!r}: give each a distinct server.task")
        plan.append((name, cfg))
    return plan


def prepare(url: str, args) -> dict[str, Path]:
    """Migrate, add each task unless it exists, mint each task's client tokens; {task: tokens file}."""
    from asyncfl.cluster.db import migrate
    from asyncfl.cluster.members import session
    from asyncfl.cluster.tasks import add_task, create_tokens

    plan = planned_tasks(args)
    migrate(url)
    files = {}
    clients = [f"client-{i}" for i in range(args.clients)]
    for name, cfg in plan:
        with session(url) as conn:
            if conn.execute("SELECT 1 FROM tasks WHERE task = %s", (name,)).fetchone() is None:
                add_task(conn, cfg, args.run, name)
                print(f"task {name!r} added")
            else:
                print(f"task {name!r} exists: resuming it")
            tokens = create_tokens(conn, clients, name)
        path = tokens_path(Path(args.tokens_file), name, len(plan) > 1)
        path.touch(mode=0o600)
        path.write_text("".join(f"{client}\t{token}\n" for client, token in zip(clients, tokens)))
        files[name] = path
    return files


def up(args) -> int:
    if args.selectors < 1 or args.aggregators < 1:
        raise ConfigError("a cluster needs at least one selector and one aggregator")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    local = None
    url = args.database_url
    children: list[Child] = []
    try:
        if url is None:
            from asyncfl.cluster.postgres import LocalPostgres

            local = LocalPostgres()
            local.start()
            url = local.create_database("asyncfl")
            print(f"local PostgreSQL on port {local.port} (removed at exit)")
        tokens = prepare(url, args)
        children = start_children(url, args)
        last = args.port + args.selectors - 1
        served = ", ".join(f"{task!r} (client tokens in {path})" for task, path in tokens.items())
        print(
            f"task{'s' if len(tokens) > 1 else ''} {served}: {args.selectors} selector(s) on "
            f"http://{args.host}:{args.port}{'' if last == args.port else f'..{last}'}/, "
            f"{args.aggregators} aggregator(s), 1 coordinator; Ctrl-C stops them all",
            flush=True,
        )
        while not stop.wait(0.5):
            ended = [c for c in children if c.process.poll() is not None]
            if ended:
                print(f"{ended[0].name} exited with code {ended[0].process.returncode}: stopping", flush=True)
                return 1
        return 0
    finally:
        stop_children(children)
        if local is not None:
            local.stop()
