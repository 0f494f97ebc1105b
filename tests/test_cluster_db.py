"""The throwaway PostgreSQL harness (asyncfl.cluster.postgres) and the schema migrations
(asyncfl.cluster.db, `asyncfl db migrate`)."""

import os
import pwd
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from asyncfl.cli import main
from asyncfl.cluster import db
from asyncfl.cluster import postgres as harness
from asyncfl.config import ConfigError

TABLES_0001 = {"tasks", "members", "tokens", "slots", "leases", "partials", "updates", "versions"}
TABLES_0001 |= {"aggregator_state", "evals"}
SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}


def _uid(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _port_free(port: int) -> bool:
    """Nobody listens on it: a server (SO_REUSEADDR, as PostgreSQL binds) could bind it now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _fresh_database(cluster) -> str:
    return cluster.create_database(f"empty_{uuid.uuid4().hex[:12]}")


def _tables(url: str) -> set[str]:
    with db.connect(url) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
    return {name for (name,) in rows}


def test_cluster_runs_unprivileged_survives_restarts_and_is_removed_by_stop():
    cluster = harness.LocalPostgres()
    with cluster:
        base, port = cluster.base, cluster.port
        expected_uid = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
        assert _uid(cluster.postmaster_pid()) == expected_uid != 0
        assert os.stat(cluster.data_dir).st_uid == expected_uid
        with psycopg.connect(cluster.url) as conn:
            assert conn.execute("SHOW fsync").fetchone()[0] == "on"
            assert conn.execute("SHOW listen_addresses").fetchone()[0] == "127.0.0.1"
            conn.execute("CREATE TABLE kept (x integer)")
            conn.execute("INSERT INTO kept VALUES (1)")
        url = cluster.url
        assert cluster.restart() == url
        with psycopg.connect(url) as conn:
            conn.execute("INSERT INTO kept VALUES (2)")
        cluster.shutdown("immediate")  # a crash: no checkpoint, the WAL is replayed at start
        assert not cluster.running()
        cluster.start()
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT x FROM kept ORDER BY x").fetchall() == [(1,), (2,)]
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(url.replace(cluster.password, "wrong"), connect_timeout=5)
        pid = cluster.postmaster_pid()
    assert not base.exists()
    assert not _alive(pid)
    assert _port_free(port)


def test_cluster_is_removed_when_its_owner_is_killed():
    script = (
        "import sys, time\n"
        "from asyncfl.cluster.postgres import LocalPostgres\n"
        "pg = LocalPostgres(); pg.start()\n"
        "print(pg.base, pg.postmaster_pid(), flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        base, pid = owner.stdout.readline().split()
        assert _alive(int(pid)) and os.path.isdir(base)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    deadline = time.monotonic() + 30
    while (os.path.exists(base) or _alive(int(pid))) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(base)
    assert not _alive(int(pid))


def test_a_port_taken_before_the_first_start_is_replaced_and_a_failed_start_leaves_nothing(monkeypatch):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        real_free_port = harness.free_port
        ports = iter([busy])
        monkeypatch.setattr(harness, "free_port", lambda: next(ports, None) or real_free_port())
        with harness.LocalPostgres() as cluster:
            assert cluster.port != busy
            psycopg.connect(cluster.url).close()
        monkeypatch.setattr(harness, "free_port", lambda: busy)
        parent = tempfile.mkdtemp()
        os.chmod(parent, 0o755)  # the server's user must reach its data dir when we are root
        try:
            with pytest.raises(harness.PostgresError, match="could not bind"):
                harness.LocalPostgres(base_dir=parent).start()
            assert os.listdir(parent) == []
        finally:
            os.rmdir(parent)


def test_missing_binaries_name_the_package_and_make(monkeypatch):
    monkeypatch.setattr(harness.shutil, "which", lambda name: None)
    monkeypatch.setattr(harness.glob, "glob", lambda pattern: [])
    with pytest.raises(harness.PostgresNotInstalled, match=r"`postgresql` package.*make"):
        harness.find_bindir()


def test_migrate_creates_every_table_once(postgres):
    url = _fresh_database(postgres)
    with db.connect(url) as conn:
        assert db.schema_version(conn) == 0
        with pytest.raises(db.SchemaError, match="lacks migrations 0001.*asyncfl db migrate"):
            db.check_schema(conn)
    latest = db.migrations()[-1].version
    assert db.migrate(url) == [m.version for m in db.migrations()]
    assert _tables(url) >= TABLES_0001 | {"schema_migrations"}
    assert db.migrate(url) == []
    with db.connect(url) as conn:
        assert db.schema_version(conn) == latest
        db.check_schema(conn)
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert rows[0] == (1, "initial")
    assert len(rows) == len(db.migrations())


def test_a_role_owning_the_database_migrates_without_superuser_rights(postgres):
    role, password = f"owner_{uuid.uuid4().hex[:8]}", "s3cret"
    postgres.create_role(role, password)
    name = f"owned_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name, owner=role)
    url = postgres.url_for(name, role, password)
    assert db.migrate(url) == [m.version for m in db.migrations()]
    with db.connect(url) as conn:
        assert conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()[0] is False
        db.check_schema(conn)
        owners = {owner for (owner,) in conn.execute("SELECT tableowner FROM pg_tables WHERE schemaname = 'public'")}
    assert owners == {role}


def test_connections_do_not_autocommit_and_time_out(pg_url):
    with db.connect(pg_url) as conn:
        assert conn.autocommit is False
        assert conn.info.get_parameters()["connect_timeout"] == str(db.CONNECT_TIMEOUT_S)
        conn.execute("INSERT INTO members (id, role) VALUES ('m', 'selector')")
        conn.rollback()
        assert conn.execute("SELECT count(*) FROM members").fetchone()[0] == 0
    with db.connect(pg_url + "?connect_timeout=3") as conn:
        assert conn.info.get_parameters()["connect_timeout"] == "3"


def test_pg_url_is_a_fresh_migrated_database(pg_url):
    with db.connect(pg_url) as conn:
        db.check_schema(conn)
        assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
        conn.execute("INSERT INTO tasks (task, config, run, fingerprint, concurrency) VALUES ('t', '{}', 'r', 'f', 2)")
        conn.commit()
    assert _tables(pg_url) >= TABLES_0001


def test_concurrent_migrations_apply_once(postgres):
    """Both processes wait on the migration lock held here, then race for it when it is released."""
    url = _fresh_database(postgres)
    with psycopg.connect(url, autocommit=True) as holder:  # advisory locks are per database
        holder.execute("SELECT pg_advisory_lock(%s)", (db.MIGRATION_LOCK,))
        script = "import sys; from asyncfl.cluster.db import migrate; print(migrate(sys.argv[1]))"
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", script, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
            )
            for _ in range(2)
        ]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            waiting = holder.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            ).fetchone()[0]
            if waiting == 2:
                break
            time.sleep(0.05)
        assert waiting == 2, [p.communicate() for p in procs if p.poll() is not None]
        holder.execute("SELECT pg_advisory_unlock(%s)", (db.MIGRATION_LOCK,))
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    every = [m.version for m in db.migrations()]
    assert sorted(out.strip() for out, _ in outputs) == sorted([str(every), "[]"])
    with db.connect(url) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == every


def test_a_database_of_a_newer_asyncfl_is_refused(pg_url, capsys):
    latest = db.migrations()[-1].version
    with db.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, 'from_the_future')", (latest + 1,))
        conn.commit()
        with pytest.raises(db.SchemaError, match="newer than this asyncfl knows"):
            db.check_schema(conn)
    with pytest.raises(db.SchemaError, match=f"at version {latest + 1}, newer than this asyncfl knows"):
        db.migrate(pg_url)
    assert main(["db", "migrate", "--database-url", pg_url]) == 2
    assert "upgrade asyncfl" in capsys.readouterr().err


def test_a_diverged_migration_is_refused(postgres):
    url = _fresh_database(postgres)
    with db.connect(url) as conn:
        conn.execute(db._SCHEMA_TABLE)
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (1, 'something_else')")
        conn.commit()
    with pytest.raises(db.SchemaError, match="diverged"):
        db.migrate(url)
    assert "tasks" not in _tables(url)


def test_cli_migrates_from_the_flag_or_the_environment(postgres, monkeypatch, capsys):
    url = _fresh_database(postgres)
    monkeypatch.setenv("ASYNCFL_DATABASE_URL", url)
    assert main(["db", "migrate"]) == 0
    assert capsys.readouterr().out.startswith("applied migrations 0001")
    monkeypatch.delenv("ASYNCFL_DATABASE_URL")
    assert main(["db", "migrate", "--database-url", url]) == 0
    assert capsys.readouterr().out.strip() == "database schema is up to date"
    assert _tables(url) >= TABLES_0001
    with pytest.raises(SystemExit):
        main(["db", "migrate"])
    assert "--database-url" in capsys.readouterr().err


def test_cli_reports_an_unreachable_database(capsys):
    url = f"postgresql://nobody:x@127.0.0.1:{harness.free_port()}/none"
    assert main(["db", "migrate", "--database-url", url]) == 2
    assert "cannot reach the database" in capsys.readouterr().err


def test_a_failing_migration_is_rolled_back_alone(postgres, monkeypatch):
    """Each migration is its own transaction: those before a broken one stay applied."""
    url = _fresh_database(postgres)
    shipped = db.migrations()
    broken = db.Migration(shipped[-1].version + 1, "broken", "CREATE TABLE half_done (x integer); SELECT nope;")
    monkeypatch.setattr(db, "migrations", lambda: [*shipped, broken])
    with pytest.raises(db.SchemaError, match=f"migration {broken.version:04d}_broken failed"):
        db.migrate(url)
    tables = _tables(url)
    assert "half_done" not in tables and tables >= TABLES_0001
    with db.connect(url) as conn:
        assert db.schema_version(conn) == shipped[-1].version


def test_an_invalid_url_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid database URL"):
        db.connect("postgresql://[not a url")


def test_a_database_missing_an_earlier_migration_is_not_current(pg_url, monkeypatch):
    shipped = db.migrations()
    later = db.Migration(shipped[-1].version + 1, "later", "SELECT 1;")
    monkeypatch.setattr(db, "migrations", lambda: [*shipped, later])
    with db.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, 'later')", (later.version,))
        conn.execute("DELETE FROM schema_migrations WHERE version = %s", (shipped[0].version,))
        conn.commit()
        with pytest.raises(db.SchemaError, match=f"lacks migrations {shipped[0].version:04d}:"):
            db.check_schema(conn)
