"""A two-node Ray cluster on this machine (`ray start --head`, then a second `ray start
--address`), for the tests that join one from the command line with --ray-address."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncfl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict:
    """The environment of the nodes and of the command that joins them: this checkout's asyncfl."""
    source = str(Path(asyncfl.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": source, "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def two_node_cluster():
    """Yields the head's address; both nodes have one CPU and stop on exit."""
    ray_cli = Path(sys.executable).parent / "ray"
    env = node_env()
    address = f"127.0.0.1:{free_port()}"
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    head = subprocess.Popen(
        [ray_cli, "start", "--head", f"--port={address.split(':')[1]}", "--include-dashboard=false", *common], env=env
    )
    nodes = [head]
    try:
        time.sleep(5)
        nodes.append(subprocess.Popen([ray_cli, "start", f"--address={address}", *common], env=env))
        time.sleep(3)
        yield address
    finally:
        for node in reversed(nodes):
            node.terminate()
            node.wait(timeout=60)
        # the head records its address for later ray.init() calls to join: not once it is gone
        record = Path("/tmp/ray/ray_current_cluster")
        if record.exists() and record.read_text().strip().endswith(":" + address.split(":")[1]):
            record.unlink()
