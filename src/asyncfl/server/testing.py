"""Run real servers and clients as separate OS processes on loopback (tests, benchmarks).

Children are forked from a `forkserver` that has already imported torch, scikit-learn and the
web stack, so starting (or restarting after a SIGKILL) a process costs milliseconds instead
of seconds of imports; each child is still its own process running `asyncfl.cli.main`, with
its own sockets, memory and state, and nothing is shared once it is forked.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import ssl
import sys
import time
from pathlib import Path

import httpx
import yaml

from asyncfl.server.auth import ANY_TASK, CLIENT, OPERATOR, new_token
from asyncfl.server.store import Store

PRELOAD = [
    "asyncfl.server.app",
    "asyncfl.server.service",
    "asyncfl.server.commands",
    "asyncfl.client.main",
    "asyncfl.client.runtime",
    "uvicorn",
    "fastapi",
    "httpx",
]
_ctx = None


def _context():
    global _ctx
    if _ctx is None:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(var, "1")  # one thread per child: these machines are small and shared
        _ctx = multiprocessing.get_context("forkserver")
        _ctx.set_forkserver_preload(PRELOAD)
    return _ctx


def _cli_child(argv: list[str], log_path: str, env: dict[str, str]) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    os.environ.update(env)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    from asyncfl.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


class Child:
    """`asyncfl ARGV` in its own process."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.proc = _context().Process(target=_cli_child, args=(list(argv), str(log_path), env or {}), daemon=False)
        self.proc.start()
        self.pid = self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.exitcode

    def poll(self) -> int | None:
        return self.proc.exitcode

    def wait(self, timeout: float | None = None) -> int | None:
        self.proc.join(timeout)
        if self.proc.exitcode is None:
            raise TimeoutError(f"process {self.pid} still running after {timeout} s")
        return self.proc.exitcode

    def send_signal(self, sig: int) -> None:
        if self.proc.exitcode is None:
            os.kill(self.pid, sig)


def wait_healthy(proc: Child, url: str, what: str, workdir: Path, timeout: float, verify=True) -> None:
    """Until `url`/healthz answers 200; raises if the process exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {workdir}")
        try:
            if httpx.get(url + "/healthz", timeout=2, verify=verify).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def kill_child(proc: Child | None, sig: int = signal.SIGKILL) -> None:
    """Signal a process that is still running and wait for it to end."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        proc.wait(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mint_tokens(state_dir: Path, task: str, clients: list[str], role: str = CLIENT) -> list[str]:
    store = Store(state_dir)
    try:
        tokens = [new_token() for _ in clients]
        store.create_tokens(list(zip(tokens, clients)), task, role)
        return tokens
    finally:
        store.close()


class ServerProcess:
    def __init__(
        self,
        config: dict,
        workdir: Path,
        port: int | None = None,
        run: str | None = None,
        tls: tuple[Path, Path] | None = None,
    ):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "experiment.yaml"
        self.write_config(config)
        self.state_dir = self.workdir / "state"
        self.port = port or free_port()
        self.tls = tls
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.verify = ssl.create_default_context(cafile=str(tls[0])) if tls else True
        self.run = run
        self.proc: Child | None = None
        self.starts = 0
        self._operator: str | None = None

    def write_config(self, config: dict) -> None:
        self.config_path.write_text(yaml.safe_dump(config))

    def start(self, timeout: float = 120.0) -> None:
        argv = [
            "serve",
            "--config",
            str(self.config_path),
            "--state-dir",
            str(self.state_dir),
            "--port",
            str(self.port),
        ] + (["--run", self.run] if self.run else [])
        if self.tls:
            argv += ["--ssl-certfile", str(self.tls[0]), "--ssl-keyfile", str(self.tls[1])]
        self.proc = Child(argv, self.workdir / f"server-{self.starts}.log")
        self.starts += 1
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        wait_healthy(self.proc, self.url, "server", self.workdir, timeout, self.verify)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        kill_child(self.proc, sig)

    @property
    def operator_token(self) -> str:
        """An operator token, minted in the state dir on first use."""
        if self._operator is None:
            (self._operator,) = mint_tokens(self.state_dir, ANY_TASK, ["test-operator"], OPERATOR)
        return self._operator

    @property
    def operator(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.operator_token}"}

    def status(self) -> dict:
        return httpx.get(self.url + "/status", headers=self.operator, timeout=10, verify=self.verify).json()

    def history(self) -> list[dict]:
        """Every evaluation, page after page."""
        evals, since = [], 0
        while since is not None:
            page = httpx.get(
                self.url + "/v1/history", params={"since": since}, headers=self.operator, timeout=10, verify=self.verify
            ).json()
            evals += page["evals"]
            since = page["next"]
        return evals


def spawn_client(url: str, token: str, data: str, workdir: Path, name: str, *extra: str) -> Child:
    argv = [
        "client",
        "--server",
        url,
        "--data",
        data,
        "--ack-log",
        str(Path(workdir) / f"{name}.acks.jsonl"),
        "--backoff-cap",
        "1.0",
        *extra,
    ]
    return Child(argv, Path(workdir) / f"{name}.log", {"ASYNCFL_TOKEN": token})


def spawn_fleet(url: str, tokens: list[str], workdir: Path, extra_of=lambda i: ()) -> list[Child]:
    """Client processes c0, c1, ... on digits:client=0, 1, ... with those tokens; `extra_of(i)`:
    more argv for client i (an attack, a pinned TSA key)."""
    return [
        spawn_client(url, token, f"digits:client={i}", workdir, f"c{i}", *extra_of(i)) for i, token in enumerate(tokens)
    ]


def wait_all(procs: list[Child], deadline: float) -> None:
    """Wait for every process until the wall-clock `deadline` (time.time()), each at least 1 s."""
    for p in procs:
        p.wait(timeout=max(1.0, deadline - time.time()))


def stop_all(procs: list[Child], timeout: float = 10.0) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except TimeoutError:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=timeout)
