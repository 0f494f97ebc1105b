"""Connections to the cluster's PostgreSQL database and its schema migrations.

Migrations are the files `migrations/NNNN_name.sql`, applied in order, each in its own
transaction under an advisory lock (so roles starting together migrate once) and recorded in
`schema_migrations`. A database migrated by a newer asyncfl is refused: this code would
misread tables it does not know.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

try:
    import psycopg
    from psycopg.conninfo import conninfo_to_dict
except ImportError as err:  # the extra is optional: the simulator and single-process server do without it
    raise ImportError("the multi-process server needs psycopg: pip install 'asyncfl[postgres]'") from err

from asyncfl.config import ConfigError

CONNECT_TIMEOUT_S = 10
# pg_advisory_xact_lock key of migrations: any constant no other asyncfl lock uses ("asyncfl" in ASCII)
MIGRATION_LOCK = 0x6173796E63666C
_MIGRATION_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")

_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


class SchemaError(ConfigError):
    """The database's schema is not one this asyncfl can use (newer, diverged or not migrated)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def connect(url: str, **kwargs) -> psycopg.Connection:
    """A psycopg connection, autocommit off (callers commit their transactions), with a connect
    timeout unless the URL sets one: a dead database fails fast instead of hanging a role."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError as err:
        raise ConfigError(f"invalid database URL: {err}") from None
    if "connect_timeout" not in params and "connect_timeout" not in kwargs:
        kwargs["connect_timeout"] = CONNECT_TIMEOUT_S
    return psycopg.connect(url, autocommit=False, **kwargs)


def migrations() -> list[Migration]:
    """The migrations shipped with this package, in version order."""
    found = []
    for entry in resources.files("asyncfl.cluster").joinpath("migrations").iterdir():
        match = _MIGRATION_FILE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"two migrations share a version number: {versions}")
    return found


def applied_versions(conn: psycopg.Connection) -> set[int]:
    """The migrations applied to the database (none when it has no schema_migrations table)."""
    if not conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]:
        return set()
    return {version for (version,) in conn.execute("SELECT version FROM schema_migrations")}


def schema_version(conn: psycopg.Connection) -> int:
    """The newest migration applied to the database (0: none)."""
    return max(applied_versions(conn), default=0)


def check_schema(conn: psycopg.Connection) -> None:
    """Refuse to run a role against a database not migrated to exactly what this code knows."""
    applied, known = applied_versions(conn), {m.version for m in migrations()}
    if max(applied, default=0) > max(known):
        raise SchemaError(_newer_message(max(applied), max(known)))
    if missing := sorted(known - applied):
        raise SchemaError(
            f"database schema lacks migrations {', '.join(f'{v:04d}' for v in missing)}: run `asyncfl db migrate`"
        )


def migrate(url: str) -> list[int]:
    """Apply the migrations the database lacks, and generate a token signing key if there is
    none; returns the versions this call applied."""
    from asyncfl.cluster.tokens import signing_key

    known = migrations()
    applied_now = []
    with connect(url) as conn:
        # one lock for the whole loop (a session lock, held across the per-migration
        # transactions), so of two processes migrating at once one applies everything
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        conn.commit()
        try:
            _apply(conn, known, applied_now)
            with conn.transaction():
                signing_key(conn)  # generated here rather than at the first mint
        finally:
            conn.rollback()
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
            conn.commit()
    return applied_now


def _apply(conn: psycopg.Connection, known: list[Migration], applied_now: list[int]) -> None:
    for migration in known:
        with conn.transaction():
            conn.execute(_SCHEMA_TABLE)
            applied = dict(conn.execute("SELECT version, name FROM schema_migrations").fetchall())
            newest = max(applied, default=0)
            if newest > known[-1].version:
                raise SchemaError(_newer_message(newest, known[-1].version))
            if migration.version in applied:
                if applied[migration.version] != migration.name:
                    raise SchemaError(
                        f"migration {migration.version} was applied as {applied[migration.version]!r}, "
                        f"this asyncfl has {migration.name!r}: the database comes from a diverged asyncfl"
                    )
                continue
            try:
                conn.execute(migration.sql)  # no parameters: several statements in one go
            except psycopg.Error as err:
                raise SchemaError(f"migration {migration.version:04d}_{migration.name} failed: {err}") from err
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
            )
            applied_now.append(migration.version)


def _newer_message(have: int, known: int) -> str:
    return (
        f"database schema is at version {have}, newer than this asyncfl knows ({known}): "
        "it was migrated by a newer asyncfl; upgrade asyncfl"
    )


def migrate_command(args) -> int:
    """`asyncfl db migrate`: prints what it applied."""
    try:
        applied = migrate(args.database_url)
    except psycopg.OperationalError as err:
        raise ConfigError(f"cannot reach the database: {str(err).strip()}") from None
    if applied:
        print(f"applied migrations {', '.join(f'{v:04d}' for v in applied)}")
    else:
        print("database schema is up to date")
    return 0
