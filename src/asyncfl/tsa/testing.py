"""A real `asyncfl tsa serve` process on loopback, for tests and benchmarks (see
asyncfl.server.testing for the server and clients)."""

from __future__ import annotations

import secrets
import signal
import time
from pathlib import Path

import httpx

from asyncfl.server.testing import Child, free_port
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
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tsa exited with {self.proc.returncode}; see {self.workdir}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"tsa not ready after {timeout} s")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
