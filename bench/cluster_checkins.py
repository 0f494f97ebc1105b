"""Check-ins per second one cluster selector answers on its hot path: every check-in answered
"retry" (no slot granted: no coordinator runs), so the figure is the selector's HTTP, token
cache and in-memory task state, with no database round trip per request. A local PostgreSQL,
one `asyncfl serve --role selector` process and load from worker processes on loopback.

    python bench/cluster_checkins.py [--json] [--seconds 10] [--workers 2] [--threads 8]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from asyncfl.cluster.db import migrate  # noqa: E402
from asyncfl.cluster.members import session  # noqa: E402
from asyncfl.cluster.postgres import LocalPostgres, free_port  # noqa: E402
from asyncfl.cluster.tasks import add_task, create_token  # noqa: E402
from asyncfl.config import validate  # noqa: E402

EXPERIMENT = {
    "name": "bench",
    "seed": 0,
    "data": {"num_clients": 8, "partition": {"kind": "iid"}},
    "model": {"name": "mlp", "hidden": [16]},
    "runs": [{"name": "fedbuff", "algorithm": {"name": "fedbuff", "buffer_size": 4}, "scheduler": {"concurrency": 8}}],
}


def load(url: str, tokens: list[str], threads: int, seconds: float, out) -> None:
    """One worker process: `threads` keep-alive clients checking in for `seconds`."""
    counts = [0] * threads

    def run(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {tokens[i % len(tokens)]}"}) as http:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                r = http.post("/v1/checkin", json={"eligible": True})
                if r.status_code == 200 and r.json()["action"] == "retry":
                    counts[i] += 1

    pool = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    out.put(sum(counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, LocalPostgres() as pg:
        url = pg.create_database("bench")
        migrate(url)
        with session(url) as conn:
            add_task(conn, validate(EXPERIMENT))
            tokens = [create_token(conn, f"c{i}", "fedbuff") for i in range(args.workers * args.threads)]
        settings = Path(tmp) / "selector.yaml"
        settings.write_text("rate_per_s: 1000000\nrate_burst: 1000000\nmax_connections: 1024\n")
        port = free_port()
        argv = [sys.executable, "-m", "asyncfl.cli", "serve", "--role", "selector", "--database-url", url]
        argv += ["--port", str(port), "--server-config", str(settings)]
        selector = subprocess.Popen(argv, env=os.environ | {"OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise
                time.sleep(0.2)
            httpx.post(f"{base}/v1/checkin", headers={"Authorization": f"Bearer {tokens[0]}"}, timeout=60)  # warm
            out = multiprocessing.get_context("spawn").Queue()
            procs = [
                multiprocessing.get_context("spawn").Process(
                    target=load, args=(base, tokens[w * args.threads :], args.threads, args.seconds, out)
                )
                for w in range(args.workers)
            ]
            for p in procs:
                p.start()
            total = sum(out.get() for _ in procs)
            for p in procs:
                p.join()
        finally:
            selector.terminate()
            selector.wait(15)
    result = {
        "checkins_per_s": round(total / args.seconds, 1),
        "clients": args.workers * args.threads,
        "seconds": args.seconds,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result) if args.json else f"{result['checkins_per_s']} retry check-ins/s ({result})")


if __name__ == "__main__":
    main()
