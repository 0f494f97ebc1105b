"""A real `asyncfl tsa serve` process on loopback, for tests and benchmarks (see
asyncfl.server.testing for the server and clients)."""

from __future__ import annotations

import secrets
import signal
from pathlib import Path

from asyncfl.server.testing import Child, free_port, kill_child, wait_healthy
from asyncfl.tsa.state import init_state


class TsaProcess:
    """`asyncfl tsa serve` for `task`, with its terms from the server's experiment YAML."""

    def __init__(self, workdir: Path, task: str, config_path: Path, port: int | None = None):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.state_dir = self.workdir / "tsa-state"
        self.public_key = init_state(self.state_dir)
        self.token_file = self.workdir / "tsa-token"
        self.token_file.write_text(secrets.token_urlsafe(32))
        self.task, self.config_path = task, Path(config_path)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: Child | None = None
        self.starts = 0

    def server_settings(self) -> dict:
        """The `server:` entries that point an FL server at this TSA."""
        return {"tsa_url": self.url, "tsa_public_key": self.public_key, "tsa_token_file": str(self.token_file)}

    def start(self, timeout: float = 120.0) -> None:
        argv = ["tsa", "serve", "--state", str(self.state_dir), "--task", self.task, "--port", str(self.port)]
        argv += ["--token-file", str(self.token_file), "--config", str(self.config_path)]
        self.proc = Child(argv, self.workdir / f"tsa-{self.starts}.log")
        self.starts += 1
        wait_healthy(self.proc, self.url, "tsa", self.workdir, timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        kill_child(self.proc, sig)
