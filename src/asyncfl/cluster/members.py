"""Membership: every role process heartbeats into `members`; one whose heartbeat is older than
the timeout is dead. Times are the database's clock (now()), so the processes' clocks need not
agree."""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

import psycopg
from psycopg.types.json import Jsonb

ROLES = ("selector", "aggregator", "coordinator")


@dataclass(frozen=True)
class Timing:
    """How often members heartbeat and how long a silent one counts as alive. The timeout is
    several heartbeats, so one slow transaction does not kill a member."""

    heartbeat_s: float = 0.5
    member_timeout_s: float = 3.0


DEFAULT_TIMING = Timing()


def session(url: str) -> psycopg.Connection:
    """A long-lived role's connection, in autocommit: each statement stands alone unless
    grouped in `conn.transaction()`, so no transaction stays open between rounds."""
    from asyncfl.cluster.db import connect

    conn = connect(url)
    conn.autocommit = True
    return conn


def member_id(role: str) -> str:
    """Unique per process start: a restarted process is a new member (its old self's tasks and
    slots move on through the usual timeouts)."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def heartbeat(conn: psycopg.Connection, member: str, role: str, address: str | None = None, stats=None) -> None:
    conn.execute(
        "INSERT INTO members(id, role, address, stats) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), stats = EXCLUDED.stats, address = EXCLUDED.address",
        (member, role, address, Jsonb(stats or {})),
    )


def live(conn: psycopg.Connection, role: str, timeout_s: float) -> list[str]:
    """Ids of the live members of a role, sorted (the order fair shares are dealt in)."""
    rows = conn.execute(
        "SELECT id FROM members WHERE role = %s AND heartbeat_at > now() - make_interval(secs => %s) ORDER BY id",
        (role, timeout_s),
    ).fetchall()
    return [r[0] for r in rows]


def leave(conn: psycopg.Connection, member: str) -> None:
    """A clean stop: the member is dead at once, so its slots and tasks move on without waiting
    for the timeout."""
    conn.execute("DELETE FROM members WHERE id = %s", (member,))
