"""Server ingest benchmark: updates/s and upload latency with 8 concurrent clients and a
~1M-parameter model, against a real server process on loopback.

Clients upload precomputed deltas (no local training), so the figure is the server's: HTTP,
frame validation (shapes, finiteness, norm), the FedBuff fold and the durable SQLite commit
that precedes every acknowledgement.

    python bench/server.py [--json] [--seconds 15] [--clients 8] [--hidden 1024 960]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from asyncfl import wire  # noqa: E402
from asyncfl.server.testing import ServerProcess, mint_tokens  # noqa: E402


def experiment(hidden: list[int], clients: int, buffer_size: int) -> dict:
    return {
        "name": "bench",
        "seed": 0,
        "data": {"partition": {"kind": "iid"}, "num_clients": clients},
        "model": {"name": "mlp", "hidden": hidden},
        "server": {
            "lease_timeout": 120,
            "retry_after": 0.01,
            "eval_every_s": 5,
            "max_body_bytes": 64 * 2**20,
            "rate_per_s": 1e6,
            "rate_burst": 1e6,
            "max_update_norm": 1e6,
        },
        "runs": [
            {
                "name": "bench",
                "algorithm": {"name": "fedbuff", "buffer_size": buffer_size},
                "scheduler": {"mode": "async", "concurrency": clients},
            }
        ],
    }


def worker(url: str, token: str, names, shapes, seconds: float, warmup: float, out: list, errors: list) -> None:
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
    n = sum(math.prod(s) for s in shapes)
    delta = torch.from_numpy(np.random.default_rng().normal(0, 1e-3, n).astype(np.float32))
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < warmup + seconds:
        lease = http.post("/v1/checkin", json={"eligible": True}).json()
        if lease["action"] != "train":
            time.sleep(lease.get("retry_after", 0.01))
            continue
        body = wire.encode_update(
            lease_id=lease["lease_id"],
            base_version=lease["base_version"],
            idempotency_key=uuid.uuid4().hex,
            n_examples=100,
            steps=10,
            loss=1.0,
            delta=delta,
            names=names,
            shapes=shapes,
        )
        t0 = time.perf_counter()
        r = http.post("/v1/update", content=body)
        t1 = time.perf_counter()
        if r.status_code != 200:
            errors.append(r.status_code)
        elif t0 - t_start >= warmup:
            out.append((t1, t1 - t0))
    http.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--hidden", type=int, nargs="+", default=[1024, 960], help="MLP widths (default ~1.06M params)")
    ap.add_argument("--buffer-size", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(experiment(args.hidden, args.clients, args.buffer_size), Path(tmp))
        tokens = mint_tokens(server.state_dir, "bench", [f"b{i}" for i in range(args.clients)])
        server.start()
        task = httpx.get(server.url + "/v1/task", headers={"Authorization": f"Bearer {tokens[0]}"}).json()
        names = [t["name"] for t in task["tensors"]]
        shapes = [tuple(t["shape"]) for t in task["tensors"]]
        params = sum(math.prod(s) for s in shapes)
        samples: list = []
        errors: list = []
        threads = [
            threading.Thread(
                target=worker, args=(server.url, tok, names, shapes, args.seconds, args.warmup, samples, errors)
            )
            for tok in tokens
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status = server.status()
        server.kill()
    if not samples:
        print("no update was accepted", file=sys.stderr)
        return 1
    ends = sorted(t for t, _ in samples)
    lat = np.array([latency for _, latency in samples]) * 1000
    result = {
        "updates_per_s": round(len(samples) / args.seconds, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
        "clients": args.clients,
        "params": params,
        "payload_bytes": params * 4,
        "updates": len(samples),
        "seconds": args.seconds,
        "server_version": status["version"],
        "errors": len(errors),
        "window_s": round(ends[-1] - ends[0], 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['updates_per_s']} updates/s, upload p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms "
            f"({args.clients} clients, {params:,} params, {result['payload_bytes'] / 2**20:.1f} MiB per update, "
            f"{result['updates']} updates in {args.seconds:g} s, {len(errors)} errors)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
