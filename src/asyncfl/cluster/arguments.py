"""The command line of the multi-process server: `serve --role`, `cluster task|up` and
`token create --database-url`. Argument parsing only, so `asyncfl --help` stays light."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

ROLES = ("selector", "aggregator", "coordinator")
DATABASE_URL_ENV = "ASYNCFL_DATABASE_URL"


def add_database_url(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--database-url, defaulting to $ASYNCFL_DATABASE_URL (a Kubernetes Secret, say)."""
    env = os.environ.get(DATABASE_URL_ENV)
    p.add_argument(
        "--database-url",
        default=env,
        required=required and env is None,
        metavar="URL",
        help=f"PostgreSQL URL, e.g. postgresql://user:pass@host:5432/asyncfl (default: ${DATABASE_URL_ENV})",
    )


def add_serve_role(srv: argparse.ArgumentParser) -> None:
    srv.add_argument(
        "--role",
        choices=("server", *ROLES),
        default="server",
        help="server (default): the single process over SQLite; selector, aggregator or coordinator: one "
        "role of the multi-process server over PostgreSQL (--database-url; see docs/deploy.md)",
    )
    add_database_url(srv, required=False)
    srv.add_argument(
        "--member-timeout",
        type=float,
        default=3.0,
        help="coordinator: seconds after its last heartbeat a selector or aggregator counts as dead (its free "
        "slots and its tasks move on)",
    )


def add_token_database(create: argparse.ArgumentParser) -> None:
    add_database_url(create, required=False)


def _task_source(p: argparse.ArgumentParser, many: bool = False) -> None:
    if many:
        p.add_argument(
            "--config",
            type=Path,
            action="append",
            required=True,
            help="experiment YAML (may hold a server: section); repeat it to serve several tasks at once, "
            "each named by its server.task, else its run's name, with its own tokens file",
        )
        p.add_argument("--run", help="which run of each config (default: its first)")
    else:
        p.add_argument("--config", type=Path, required=True, help="experiment YAML (may hold a server: section)")
        p.add_argument("--run", help="which of the config's runs (default: the first)")
    p.add_argument("--server-config", type=Path, help="server settings YAML (limits, leases, evaluation)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seed", type=int)


def add_cluster_command(sub) -> None:
    cl = sub.add_parser("cluster", help="the multi-process server over PostgreSQL: tasks, and a local cluster")
    csub = cl.add_subparsers(dest="cluster_command", required=True)
    task = csub.add_parser("task", help="add or list the tasks the cluster trains")
    tsub = task.add_subparsers(dest="task_command", required=True)
    add = tsub.add_parser("add", help="add a task: one (asynchronous) run of an experiment config")
    add_database_url(add)
    _task_source(add)
    add.add_argument("--task", help="task id tokens are bound to (default: server.task, else the run's name)")
    ls = tsub.add_parser("list", help="the tasks, their versions, owners and leased slots")
    add_database_url(ls)
    finish = tsub.add_parser("finish", help="stop leasing a task's slots (uploads in flight still fold)")
    add_database_url(finish)
    finish.add_argument("--task", required=True)
    up = csub.add_parser("up", help="run a whole cluster on this machine (child processes, prefixed logs)")
    _task_source(up, many=True)
    add_database_url(up, required=False)
    up.add_argument("--task", help="task id, with a single --config (default: server.task, else the run's name)")
    up.add_argument("--selectors", type=int, default=2, help="selector processes (HTTP, consecutive ports)")
    up.add_argument("--aggregators", type=int, default=1, help="aggregator processes")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8080, help="the first selector's port")
    up.add_argument("--clients", type=int, default=10, help="client tokens to mint per task")
    up.add_argument(
        "--tokens-file",
        type=Path,
        default=Path("cluster-tokens.txt"),
        help="where the tokens go (CLIENT TOKEN lines); with several tasks, each task's go to STEM-TASK.SUFFIX "
        "(cluster-tokens-fedbuff.txt)",
    )
    up.add_argument("--log-level", default="warning")
