"""HTTP ingest with the TSA against plaintext: updates/s a real `asyncfl serve` acknowledges from
N concurrent uploader threads, once in plaintext FedBuff and once with `secure_aggregation: tsa`
and a real `asyncfl tsa serve`, same model, K and uploaders, side by side in one run.

Uploaders check in and upload synthetic updates (no training). Plaintext frames carry one
precomputed float32 delta; masked frames carry one precomputed masked vector followed by a
fresh seed sealed to the TSA under each lease id (sealing is what a frame cannot precompute: it
is bound to the lease). So the server's work is the real one on both sides (HTTP, frame checks,
the TSA's vetting of each sealed seed, the fold, the durable commit, the TSA's unmask per step),
while the unmasked sums are noise, as the plaintext deltas are.

    python bench/secagg_ingest.py [--json] [--seconds 10] [--clients 8] [--pairs 3] [--hidden 1024 960]
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

from server import experiment as server_experiment  # noqa: E402  (bench/server.py)

from asyncfl import wire  # noqa: E402
from asyncfl.secagg import FixedPointCodec, Ring, prg  # noqa: E402
from asyncfl.secagg.crypto import from_base64  # noqa: E402
from asyncfl.secagg.tsa import seal_seed  # noqa: E402
from asyncfl.server.testing import ServerProcess, mint_tokens  # noqa: E402
from asyncfl.tsa.testing import TsaProcess  # noqa: E402

RUN = "ingest"


def experiment(hidden: list[int], clients: int, buffer_size: int, tsa: TsaProcess | None = None) -> dict:
    """bench/server.py's FedBuff task (no rate limits, no norm guard in the way), run `RUN`,
    its uploads masked for `tsa` when given."""
    tree = server_experiment(hidden, clients, buffer_size)
    run = tree["runs"][0]
    run["name"] = RUN
    if tsa is not None:
        run["secure_aggregation"] = {"protocol": "tsa", "clip_range": 0.5}
        tree["server"] |= tsa.server_settings()
    return tree


class PlainFrames:
    def __init__(self, task: dict):
        self.names = [t["name"] for t in task["tensors"]]
        self.shapes = [tuple(t["shape"]) for t in task["tensors"]]
        n = sum(math.prod(s) for s in self.shapes)
        self.delta = torch.from_numpy(np.random.default_rng(0).normal(0, 1e-3, n).astype(np.float32))

    def frame(self, lease: dict) -> bytes:
        return wire.encode_update(**self._header(lease), delta=self.delta, names=self.names, shapes=self.shapes)

    @staticmethod
    def _header(lease: dict) -> dict:
        return {
            "lease_id": lease["lease_id"],
            "base_version": lease["base_version"],
            "idempotency_key": uuid.uuid4().hex,
            "n_examples": 10,
            "steps": 10,
            "loss": 1.0,
        }


class MaskedFrames(PlainFrames):
    """The precomputed masked vector, then a fresh seed sealed under the lease id."""

    def __init__(self, task: dict):
        super().__init__(task)
        sa = task["secure_aggregation"]
        self.key, self.task, self.spec = from_base64(sa["tsa_public_key"]), task["task"], sa["codec"]
        codec = FixedPointCodec(sa["clip_range"], sa["max_total_weight"], Ring(sa["bits"]))
        encoded = codec.encode(self.delta.numpy(), np.random.default_rng(0))
        self.masked = codec.ring.to_bytes(
            codec.ring.add(encoded, prg.mask(os.urandom(prg.SEED_BYTES), encoded.shape[0], codec.ring))
        )

    def frame(self, lease: dict) -> bytes:
        sealed = seal_seed(os.urandom(prg.SEED_BYTES), self.key, self.task, lease["lease_id"])
        return wire.encode_update(
            **self._header(lease),
            delta=self.delta,
            names=self.names,
            shapes=self.shapes,
            payload=self.masked + sealed,
            codec=self.spec,
        )


def uploader(url: str, token: str, frames: PlainFrames, until: float, measure_from: float, out: list) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
        while time.perf_counter() < until:
            lease = http.post("/v1/checkin", json={"eligible": True}).json()
            if lease["action"] != "train":
                time.sleep(lease.get("retry_after", 0.01))
                continue
            body = frames.frame(lease)
            t0 = time.perf_counter()
            r = http.post("/v1/update", content=body)
            t1 = time.perf_counter()
            if t0 >= measure_from:
                out.append((r.status_code, t1 - t0))


def ingest(workdir: Path, hidden: list[int], clients: int, buffer_size: int, seconds: float, warmup: float, tsa: bool):
    """Updates/s acknowledged (200) over `seconds` after `warmup`, with upload p50 latency."""
    server = ServerProcess(experiment(hidden, clients, buffer_size), workdir)
    process = None
    if tsa:
        process = TsaProcess(workdir, RUN, server.config_path)
        server.write_config(experiment(hidden, clients, buffer_size, process))
        process.start()
    tokens = mint_tokens(server.state_dir, RUN, [f"b{i}" for i in range(clients)])
    try:
        server.start()
        task = httpx.get(server.url + "/v1/task", headers={"Authorization": f"Bearer {tokens[0]}"}).json()
        frames = (MaskedFrames if tsa else PlainFrames)(task)
        samples: list = []
        start = time.perf_counter()
        threads = [
            threading.Thread(
                target=uploader, args=(server.url, tok, frames, start + warmup + seconds, start + warmup, samples)
            )
            for tok in tokens
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        version = server.status()["version"]
    finally:
        server.kill()
        if process is not None:
            process.kill()
    accepted = [latency for status, latency in samples if status == 200]
    return {
        "updates_per_s": len(accepted) / seconds,
        "p50_ms": 1e3 * float(np.median(accepted)) if accepted else None,
        "refused": len(samples) - len(accepted),
        "steps": version,
        "params": frames.delta.numel(),
    }


def compare(hidden: list[int], clients: int, buffer_size: int, seconds: float, warmup: float, pairs: int = 3) -> dict:
    """`pairs` plaintext and TSA runs against fresh servers, alternating which goes first (the
    machine's load drifts): each pair's figures, and the median of the pairs' TSA / plaintext."""
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(pairs):
            pair = {}
            for tsa in (False, True) if i % 2 == 0 else (True, False):
                name = "tsa" if tsa else "plaintext"
                pair[name] = ingest(Path(tmp) / f"{name}-{i}", hidden, clients, buffer_size, seconds, warmup, tsa)
            plain = pair["plaintext"]["updates_per_s"]
            runs.append(pair | {"ratio": pair["tsa"]["updates_per_s"] / plain if plain else None})
    ratios = [r["ratio"] for r in runs if r["ratio"] is not None]
    median = float(np.median(ratios)) if ratios else None
    return {
        "clients": clients,
        "buffer": buffer_size,
        "params": runs[0]["tsa"]["params"],
        "runs": runs,
        "ratio": median,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 960], help="MLP widths (default ~1.06M params)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--buffer", type=int, default=10)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("--pairs", type=int, default=3, help="plaintext and TSA runs, alternating")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = compare(args.hidden, args.clients, args.buffer, args.seconds, args.warmup, args.pairs)
    print(json.dumps(result, indent=2) if args.json else summary(result))


def summary(r: dict) -> str:
    pairs = ", ".join(
        f"{run['tsa']['updates_per_s']:.1f} / {run['plaintext']['updates_per_s']:.1f} = {run['ratio']:.2f}"
        for run in r["runs"]
    )
    return (
        f"HTTP ingest, {r['params']:,} params, {r['clients']} uploaders, K = {r['buffer']}: TSA / plaintext "
        f"updates/s {pairs}; median {r['ratio']:.2f} (goal >= 0.70)"
    )


if __name__ == "__main__":
    main()
