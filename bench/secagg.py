"""What secure aggregation costs, measured side by side in one run.

- per update, client side (a model of `--params` coordinates, 1M by default): the plaintext
  upload (float32 bytes) against the TSA path (clip + fixed-point encode + PRG mask + seal the
  seed to the TSA);
- per buffer of K updates, server side: plaintext FedBuff (decode each float32 upload, fold it
  into the buffer with its staleness weight, step) against the TSA path (fold each masked upload
  in the ring times its integer weight, the TSA's weighted mask sum, unmask, decode, step), and
  the TSA's own share of it; hence the updates/s the server's aggregation ingests with the TSA
  against plaintext (goal: at least 70 %);
- over HTTP (`secagg_ingest.py`, skipped with `--no-http`): updates/s a real `asyncfl serve` with
  a real `asyncfl tsa serve` acknowledges from `--uploaders` concurrent uploader threads against
  the same server in plaintext, same model (an MLP of `--hidden` widths, ~1.06M parameters);
- a synchronous round for n = 10, 100, 1,000 in-process clients (vectors of `--round-params`
  coordinates): SecAgg+ (k = 2 ceil(log2 n) neighbours) against the original all-pairs SecAgg
  (k = n - 1), each with a threshold of a majority of a neighbourhood, client seconds per client and server seconds per round, bytes
  per client. All-pairs rounds above `--all-pairs-max` clients are not run (a 1,000-client
  all-pairs round takes about 1 s per client of Shamir sharing alone here).

    python bench/secagg.py [--params 1000000] [--buffer 10] [--uploaders 8] [--no-http] [--json]

The in-process figures leave out HTTP and the durable commit; the HTTP ingest includes them,
and the TSA's vetting of each upload.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import numpy as np
import torch
from secagg_ingest import compare as http_ingest
from secagg_ingest import summary as ingest_summary

from asyncfl.algorithms import aggregators
from asyncfl.algorithms.server_opt import SGD
from asyncfl.algorithms.staleness import inverse_sqrt
from asyncfl.algorithms.types import ClientUpdate, ServerState
from asyncfl.secagg import FixedPointCodec, MaskedBuffer, MemoryStore, TrustedAggregator, make_params, mask_for_tsa
from asyncfl.secagg import run_round as secagg_round
from asyncfl.secagg.crypto import KeyPair

TASK = "bench"
WEIGHT = 4  # the integer weight of one update (a quantized staleness weight)


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def client_costs(length: int, codec: FixedPointCodec, tsa_key: bytes, repeats: int) -> dict:
    rng = np.random.default_rng(0)
    delta = torch.randn(length) * 0.01

    def plaintext():
        return delta.numpy().astype(np.float32).tobytes()

    def tsa():
        clipped = np.clip(delta.numpy(), -codec.clip_range, codec.clip_range)
        return mask_for_tsa(codec.encode(clipped, rng), codec.ring, tsa_key, TASK, "u")

    return {"plaintext_s": timed(plaintext, repeats), "tsa_s": timed(tsa, repeats)}


def server_costs(length: int, k: int, codec: FixedPointCodec, key: KeyPair, repeats: int) -> dict:
    """Seconds per buffer of k updates: plaintext FedBuff against the TSA path (and its TSA share)."""
    rng = np.random.default_rng(1)
    deltas = [torch.randn(length) * 0.01 for _ in range(k)]
    frames = [d.numpy().astype(np.float32).tobytes() for d in deltas]
    steps = iter(range(10**9))

    def uploads():
        return [
            mask_for_tsa(codec.encode(d.numpy(), rng), codec.ring, key.public_bytes(), TASK, f"u{next(steps)}")
            for d in deltas
        ]

    def plaintext():
        agg = aggregators.fedbuff(SGD(1.0), k, inverse_sqrt())
        state = ServerState(torch.zeros(length))
        for i, frame in enumerate(frames):
            delta = torch.from_numpy(np.frombuffer(frame, dtype=np.float32).copy())
            agg.submit(state, ClientUpdate(i, 0, delta, 10, 5, 1.0), state.w)

    tsa_seconds = []

    def secure(batch):
        tsa = TrustedAggregator(key, MemoryStore(), TASK, length, k, WEIGHT * k, bits=codec.ring.bits)
        buffer = MaskedBuffer(codec, length)
        for upload in batch:
            buffer.fold(upload, WEIGHT)
        request = buffer.request(f"step-{next(steps)}")
        t0 = time.perf_counter()
        response = tsa.unmask(request)
        tsa_seconds.append(time.perf_counter() - t0)
        total = torch.from_numpy(buffer.unmask(response) / buffer.total_weight)
        SGD(1.0).step(torch.zeros(length), total.float())

    batches = [uploads() for _ in range(repeats + 1)]
    secure_s = timed(lambda: secure(batches.pop()), repeats)
    return {
        "plaintext_s": timed(plaintext, repeats),
        "tsa_path_s": secure_s,
        "tsa_unmask_s": statistics.median(tsa_seconds[1:]),
    }


def round_costs(n: int, neighbours: int | None, length: int) -> dict:
    """One round; the threshold is a majority of each client's neighbourhood (itself included)."""
    threshold = (n if neighbours is None else neighbours + 1) // 2 + 1
    codec = FixedPointCodec(0.5, n)
    rng = np.random.default_rng(2)
    updates = {c: rng.uniform(-0.1, 0.1, length) for c in range(n)}
    params = make_params(n, threshold, neighbours, length)
    t0 = time.perf_counter()
    r = secagg_round(params, codec, updates, dict.fromkeys(updates, 1), rng)
    return {
        "clients": n,
        "neighbours": params.neighbours,
        "threshold": threshold,
        "wall_s": time.perf_counter() - t0,
        "client_s_per_client": sum(r.client_seconds.values()) / n,
        "server_s": sum(r.server_seconds.values()),
        "upload_bytes_per_client": sum(r.upload_bytes.values()) / n,
        "download_bytes_per_client": sum(r.download_bytes.values()) / n,
        "max_error": float(np.max(np.abs(r.weighted_sum - sum(np.clip(u, -0.5, 0.5) for u in updates.values())))),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=int, default=1_000_000, help="model coordinates for the per-update costs")
    p.add_argument("--buffer", type=int, default=10, help="FedBuff's K")
    p.add_argument("--round-params", type=int, default=10_000, help="vector length in the sync rounds")
    p.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    p.add_argument("--all-pairs-max", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--uploaders", type=int, default=8, help="concurrent uploaders in the HTTP ingest")
    p.add_argument("--hidden", type=int, nargs="+", default=[1024, 960], help="MLP widths in the HTTP ingest")
    p.add_argument("--http-seconds", type=float, default=10.0, help="measured seconds per HTTP ingest run")
    p.add_argument("--http-pairs", type=int, default=3, help="plaintext and TSA HTTP ingest runs, alternating")
    p.add_argument("--no-http", action="store_true", help="skip the HTTP ingest")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    key = KeyPair()
    codec = FixedPointCodec(0.5, WEIGHT * args.buffer)
    client = client_costs(args.params, codec, key.public_bytes(), args.repeats)
    server = server_costs(args.params, args.buffer, codec, key, args.repeats)
    ingest_ratio = server["plaintext_s"] / server["tsa_path_s"]
    rounds = []
    for n in args.clients:
        rounds.append({"protocol": "secagg_plus", **round_costs(n, 2 * math.ceil(math.log2(n)), args.round_params)})
        if n <= args.all_pairs_max:
            rounds.append({"protocol": "secagg", **round_costs(n, None, args.round_params)})
    http = (
        None
        if args.no_http
        else http_ingest(args.hidden, args.uploaders, args.buffer, args.http_seconds, 2.0, args.http_pairs)
    )
    result = {
        "params": args.params,
        "buffer": args.buffer,
        "client_per_update": client,
        "server_per_buffer": server,
        "ingest_updates_per_s": {
            "plaintext": args.buffer / server["plaintext_s"],
            "tsa": args.buffer / server["tsa_path_s"],
            "ratio": ingest_ratio,
            # the TSA is its own process: the server's share of the path, what limits its ingest
            "tsa_server_share": args.buffer / (server["tsa_path_s"] - server["tsa_unmask_s"]),
            "server_share_ratio": server["plaintext_s"] / (server["tsa_path_s"] - server["tsa_unmask_s"]),
        },
        "http_ingest": http,
        "rounds": rounds,
        "round_params": args.round_params,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"per update, client, {args.params:,} coordinates:")
    print(
        f"  plaintext float32 {1e3 * client['plaintext_s']:.1f} ms, TSA (encode+mask+seal) {1e3 * client['tsa_s']:.1f} ms"
    )
    print(f"per buffer of K = {args.buffer}, server:")
    print(
        f"  plaintext {1e3 * server['plaintext_s']:.0f} ms, TSA path {1e3 * server['tsa_path_s']:.0f} ms "
        f"(of which the TSA {1e3 * server['tsa_unmask_s']:.0f} ms)"
    )
    u = result["ingest_updates_per_s"]
    print(f"  ingest: {u['plaintext']:.0f} vs {u['tsa']:.0f} updates/s, TSA / plaintext = {u['ratio']:.2f}")
    print(
        f"  the server process's share (the TSA runs in its own): {u['tsa_server_share']:.0f} updates/s, "
        f"{u['server_share_ratio']:.2f} of plaintext (goal >= 0.70)"
    )
    if http is not None:
        print(ingest_summary(http))
    print(f"sync rounds, {args.round_params:,} coordinates:")
    print("| protocol | n | k | t | client s per client | server s | bytes up per client | bytes down per client |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rounds:
        print(
            f"| {r['protocol']} | {r['clients']} | {r['neighbours']} | {r['threshold']} | "
            f"{r['client_s_per_client']:.3f} | {r['server_s']:.2f} | {r['upload_bytes_per_client']:,.0f} | "
            f"{r['download_bytes_per_client']:,.0f} |"
        )


if __name__ == "__main__":
    main()
