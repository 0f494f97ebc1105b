"""A throwaway PostgreSQL cluster for tests and `asyncfl cluster up`: Debian's (or any) server
binaries, a fresh data dir in a temp dir, a free loopback port, a generated password.

PostgreSQL refuses to run as root, so when we are root the cluster runs as Debian's `postgres`
system user (`runuser -u postgres --`, the user created when absent); otherwise as ourselves.
fsync stays on: durability tests kill processes and expect every commit to survive a restart.
A watchdog process stops the server and removes the data dir if the owning process dies without
`stop()` (kill -9), so no postmaster outlives its test session.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from asyncfl.config import ConfigError

SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
SUPERUSER = "postgres"
START_TIMEOUT_S = 60

# waits for EOF on stdin (the owner's end of a pipe closes when the owner dies, however it dies),
# then runs the teardown command, if any, and removes the cluster's directory
_WATCHDOG = """
import shutil, subprocess, sys
sys.stdin.buffer.read()
subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
shutil.rmtree(sys.argv[1], ignore_errors=True)
"""


class PostgresNotInstalled(ConfigError):
    """The server binaries (initdb, pg_ctl, postgres) are nowhere to be found."""


class PostgresError(RuntimeError):
    """initdb, start or stop failed; the message carries the server's log."""


def find_bindir() -> Path:
    """The directory of initdb/pg_ctl/postgres: `pg_config --bindir`, else Debian's newest
    /usr/lib/postgresql/N/bin, else wherever initdb is on PATH."""
    candidates: list[Path] = []
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            candidates.append(Path(out.stdout.strip()))
    debian = glob.glob("/usr/lib/postgresql/*/bin")
    candidates += sorted((Path(d) for d in debian), key=lambda d: _version_key(d.parent.name), reverse=True)
    initdb = shutil.which("initdb")
    if initdb:
        candidates.append(Path(initdb).parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in SERVER_BINARIES):
            return bindir
    raise PostgresNotInstalled(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install Debian's `postgresql` "
        "package (`make postgres`, which `make test` runs) or put its pg_config on PATH"
    )


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in name.split(".") if part.isdigit())


def free_port() -> int:
    """A loopback port nobody listens on now (the server binds it a moment later; start() retries
    with another one on the rare collision)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """The system user the server runs as when we are root (created when absent); None otherwise."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SUPERUSER)
    except KeyError:
        useradd = shutil.which("useradd") or "/usr/sbin/useradd"
        options = "--system --user-group --no-create-home --shell /bin/false".split()
        subprocess.run([useradd, *options, SUPERUSER], check=True, capture_output=True)
        return pwd.getpwnam(SUPERUSER)


class LocalPostgres:
    """One PostgreSQL cluster in a temp dir: `start()` (initdb on first use) returns its URL;
    `shutdown(mode)` stops the server keeping its data (`restart()`: stop then start on the same
    port); `stop()` tears everything down. A context manager: `with LocalPostgres() as pg:`."""

    def __init__(self, base_dir: str | Path | None = None, max_connections: int = 200) -> None:
        self.bindir = find_bindir()
        self.max_connections = max_connections
        self._base_parent = base_dir
        self.base: Path | None = None
        self.port: int | None = None
        self.password = secrets.token_urlsafe(18)
        self._user = _server_user()
        self._watchdog: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self._require_base() / "data"

    @property
    def log_path(self) -> Path:
        return self._require_base() / "server.log"

    @property
    def url(self) -> str:
        """The superuser's URL to the `postgres` database."""
        return self.url_for("postgres")

    def url_for(self, database: str, user: str = SUPERUSER, password: str | None = None) -> str:
        """URL of `database` as `user` (the superuser, with its generated password, by default)."""
        if self.port is None:
            raise PostgresError("the cluster has not been started")
        password = self.password if password is None else password
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> str:
        """Start the server (creating the cluster first time); a no-op when it runs. Returns url.
        A cluster that fails to come up the first time is removed (the error carries its log)."""
        if self.base is None:
            try:
                self._init_cluster()
                return self._start_server(attempts=5)
            except BaseException:
                self.stop()
                raise
        if self.running():
            return self.url
        return self._start_server(attempts=1)

    def running(self) -> bool:
        if self.base is None or not self.data_dir.exists():
            return False
        return self._run([str(self.bindir / "pg_ctl"), "status", "-D", str(self.data_dir)], check=False) == 0

    def shutdown(self, mode: str = "fast") -> None:
        """Stop the server, keeping its data: `fast` (clean: disconnect clients, checkpoint) or
        `immediate` (a crash: the next start replays the WAL)."""
        if not self.running():
            return
        try:
            self._pg_ctl("stop", "-m", mode, "-w", "-t", str(START_TIMEOUT_S))
        except PostgresError:
            self._kill_postmaster()

    def restart(self) -> str:
        """A clean stop and start on the same port and data: committed data survives."""
        self.shutdown("fast")
        return self.start()

    def stop(self) -> None:
        """Stop the server (fast; killed if that fails) and remove the whole cluster directory."""
        if self.base is None:
            return
        try:
            self.shutdown("fast")
        finally:
            if self.running():
                self._kill_postmaster()
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = self.port = None
            if self._watchdog is not None:
                self._watchdog.kill()
                self._watchdog.wait()
                self._watchdog.stdin.close()
                self._watchdog = None

    def create_database(self, name: str, template: str | None = None, owner: str | None = None) -> str:
        """CREATE DATABASE `name` (a copy of `template` when given, owned by the role `owner`);
        returns the superuser's URL to it."""
        import psycopg
        from psycopg import sql

        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        if owner is not None:
            query = sql.SQL("{} OWNER {}").format(query, sql.Identifier(owner))
        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(query)
        return self.url_for(name)

    def create_role(self, name: str, password: str) -> None:
        """A login role without superuser rights (what a deployment's asyncfl role would be)."""
        import psycopg
        from psycopg import sql

        query = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password))
        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(query)

    def drop_database(self, name: str) -> None:
        """DROP DATABASE, disconnecting whoever is still connected to it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def postmaster_pid(self) -> int | None:
        """The running server's process id (first line of postmaster.pid), or None."""
        try:
            return int((self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError, PostgresError):
            return None

    def __enter__(self) -> LocalPostgres:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------

    def _require_base(self) -> Path:
        if self.base is None:
            raise PostgresError("the cluster has not been created (start() first) or was removed")
        return self.base

    def _start_server(self, attempts: int) -> str:
        """pg_ctl start; with attempts > 1 (a new cluster) a port taken meanwhile is replaced."""
        for attempt in range(attempts):
            try:
                self._pg_ctl(
                    "start", "-w", "-t", str(START_TIMEOUT_S), "-l", str(self.log_path), "-o", f"-p {self.port}"
                )
                break
            except PostgresError:
                if attempt == attempts - 1 or "could not bind" not in self._log_tail():
                    raise
                self.port = free_port()  # someone took the port between free_port() and the bind
        return self.url

    def _init_cluster(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="asyncfl-pg-", dir=self._base_parent)).resolve()
        if self._user is not None:
            os.chown(self.base, self._user.pw_uid, self._user.pw_gid)
        self._start_watchdog()
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self._user is not None:
            os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        try:
            # a throwaway cluster: initdb's files are not flushed (--no-sync); the server's fsync is on
            options = f"-U {SUPERUSER} --auth scram-sha-256 -E UTF8 --locale C --no-sync".split()
            self._run([str(self.bindir / "initdb"), "-D", str(self.data_dir), "--pwfile", str(pwfile), *options])
        finally:
            pwfile.unlink()
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.data_dir}'",
            "fsync": "on",
            "synchronous_commit": "on",
            "max_connections": str(self.max_connections),
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# asyncfl LocalPostgres\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self.port = free_port()

    def _start_watchdog(self) -> None:
        """The pipe's write end stays in this process only: EOF means we are gone."""
        teardown = self._as_server_user([str(self.bindir / "pg_ctl"), "stop", "-D", str(self.data_dir), "-m", "i"])
        self._watchdog = subprocess.Popen(
            [sys.executable, "-c", _WATCHDOG, str(self.base), *teardown],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C to our process group leaves it waiting for our exit
        )

    def _pg_ctl(self, *args: str) -> None:
        self._run([str(self.bindir / "pg_ctl"), *args, "-D", str(self.data_dir)])

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if self._user is None:
            return argv
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"  # sbin: not on every root's PATH
        return [runuser, "-u", self._user.pw_name, "--", *argv]

    def _run(self, argv: list[str], check: bool = True) -> int:
        out = subprocess.run(
            self._as_server_user(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            cwd="/",  # the server's user may not be allowed into ours
        )
        if check and out.returncode != 0:
            raise PostgresError(
                f"{' '.join(argv[:2])} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}"
                f"\n-- server log:\n{self._log_tail()}"
            )
        return out.returncode

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (FileNotFoundError, PostgresError):
            return "(no log)"

    def _kill_postmaster(self) -> None:
        """SIGKILL the postmaster; its backends exit on their own when they notice it is gone."""
        pid = self.postmaster_pid()
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
