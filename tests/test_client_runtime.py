"""Client runtime: retries with backoff, data loading, eligibility, a whole run against an
in-process server, and TLS against a real server process."""

from __future__ import annotations

import json
import shutil
import subprocess

import httpx
import numpy as np
import pytest
import torch
from test_server_inputs import Harness, experiment

from asyncfl.client.http import Backoff, GaveUp, ServerApi
from asyncfl.client.runtime import ClientError, ClientRuntime, load_data
from asyncfl.server.testing import ServerProcess, mint_tokens, spawn_client


def test_backoff_is_exponential_with_full_jitter():
    b = Backoff(base=0.5, cap=4.0)
    draws = [[b.delay(a) for _ in range(300)] for a in range(6)]
    for a, d in enumerate(draws):
        assert 0 <= min(d) and max(d) <= min(4.0, 0.5 * 2**a)
        assert max(d) > 0.6 * min(4.0, 0.5 * 2**a)  # spread over the whole interval


def scripted(responses):
    """A transport answering from a script; exceptions are raised as network errors."""
    calls = []

    def handler(request):
        calls.append(request)
        r = responses.pop(0)
        if isinstance(r, Exception):
            raise r
        return r

    return httpx.MockTransport(handler), calls


def test_retries_network_errors_5xx_and_429_then_returns():
    transport, calls = scripted(
        [
            httpx.ConnectError("refused"),
            httpx.Response(503),
            httpx.ReadError("reset"),
            httpx.Response(429, json={"retry_after": 0.01}),
            httpx.Response(200, json={"ok": 1}),
        ]
    )
    api = ServerApi("http://x", "t", backoff=Backoff(base=0.001, cap=0.01), transport=transport)
    r = api.request("POST", "/v1/update", content=b"frame")
    assert r.json() == {"ok": 1} and len(calls) == 5 and api.retries == 4
    assert all(c.content == b"frame" and c.headers["authorization"] == "Bearer t" for c in calls)


def test_4xx_is_not_retried_and_budget_ends_retries():
    transport, calls = scripted([httpx.Response(422, json={"error": "bad_shape"})])
    api = ServerApi("http://x", "t", transport=transport)
    assert api.request("GET", "/v1/task").status_code == 422 and len(calls) == 1
    transport, calls = scripted([httpx.ConnectError("down")] * 100)
    api = ServerApi("http://x", "t", backoff=Backoff(base=0.01, cap=0.02), transport=transport)
    with pytest.raises(GaveUp, match="giving up"):
        api.request("GET", "/v1/task", budget=0.1)


def test_load_data_digits_partition_and_npz(tmp_path):
    cfg = experiment({"name": "fedavg"}, {"mode": "sync", "concurrency": 2})
    x, y = load_data("digits:client=3", cfg, 64)
    assert x.shape[1] == 64 and len(x) == len(y) > 0
    np.savez(tmp_path / "mine.npz", x=np.random.rand(30, 8, 8), y=np.arange(30) % 10)
    x, y = load_data(str(tmp_path / "mine.npz"), cfg, 64)
    assert x.shape == (30, 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    for bad, words in (
        ("digits:client=99", "partitions"),
        ("digits:k=1", "digits:client=K"),
        ("nope.npz", "no such file"),
    ):
        with pytest.raises(ClientError, match=words):
            load_data(bad, cfg, 64)
    np.savez(tmp_path / "bad.npz", x=np.random.rand(30, 5), y=np.zeros(30))
    with pytest.raises(ClientError, match=r"\[n, 64\]"):
        load_data(str(tmp_path / "bad.npz"), cfg, 64)


def in_process_client(h, client, **kw):
    api = ServerApi("http://testserver", h.tokens[client], backoff=Backoff(base=0.001, cap=0.01))
    api.http = h.http.__class__(
        h.http.app, base_url="http://testserver", headers={"Authorization": f"Bearer {h.tokens[client]}"}
    )
    return ClientRuntime(api, f"digits:client={ord(client) - ord('a')}", **kw)


def test_client_runtime_trains_with_the_shared_trainer_and_honours_eligibility(tmp_path):
    with Harness(tmp_path, {"name": "fedbuff", "buffer_size": 2}, {"mode": "async", "concurrency": 2}) as h:
        answers = iter([False, True, True, True])
        rt = in_process_client(
            h, "a", eligible=lambda: next(answers, True), max_trips=3, idle_wait=0.01, ack_log=tmp_path / "a.jsonl"
        )
        stats = rt.run()
        assert stats == {"trips": 3, "accepted": 3, "discarded": 0, "lost": 0, "rejected": 0}
        acks = [json.loads(line) for line in open(tmp_path / "a.jsonl")]
        assert [a["verdict"] for a in acks] == ["buffered", "stepped", "buffered"]
        assert h.http.get("/status").json()["version"] == 1
        # the update is exactly what the shared LocalTrainer computes for that lease
        log = h.server.store.query("SELECT base_version, n_examples, steps FROM updates ORDER BY seq")
        assert log[0] == (0, len(rt.y), rt.trainer.num_steps(len(rt.y)))


def test_partial_work_fits_the_round_deadline(tmp_path):
    with Harness(
        tmp_path,
        {"name": "fedprox", "mu": 0.01},
        {"mode": "sync", "concurrency": 1, "round_timeout": 5, "straggler": "partial"},
    ) as h:
        rt = in_process_client(h, "a", max_trips=2)
        rt.setup()
        rt.sec_per_step = 0.5  # a fast device: the full 2 local steps fit in 0.8 * 5 s
        assert rt._step_budget(5.0) == 2 and rt._step_budget(None) is None
        rt.sec_per_step = 4.0  # a slow one: a single step fits before the deadline
        assert rt._step_budget(5.0) == 1
        assert rt.trip() == "train"
        (steps,) = h.server.store.query("SELECT steps FROM updates")[0]
        assert steps == 1  # partial work, sent before the round closes


def make_cert(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_tokens_end_to_end(tmp_path):
    cert, key = make_cert(tmp_path)
    cfg = {
        "name": "tls",
        "data": {"num_clients": 2, "partition": {"kind": "iid"}},
        "model": {"name": "logreg"},
        "trainer": {"local_steps": 2},
        "runs": [
            {
                "name": "tls",
                "algorithm": {"name": "fedbuff", "buffer_size": 1},
                "scheduler": {"mode": "async", "concurrency": 2},
            }
        ],
    }
    server = ServerProcess(cfg, tmp_path, tls=(cert, key))
    (good,) = mint_tokens(server.state_dir, "tls", ["phone-1"])
    server.start()
    try:
        ok = spawn_client(
            server.url, good, "digits:client=0", tmp_path, "ok", "--ca-cert", str(cert), "--max-trips", "2"
        )
        untrusted = spawn_client(server.url, good, "digits:client=1", tmp_path, "untrusted", "--max-trips", "1")
        assert ok.wait(120) == 0, (tmp_path / "ok.log").read_text()
        assert untrusted.wait(120) == 2
        assert "TLS certificate verification failed" in (tmp_path / "untrusted.log").read_text()
        acks = [json.loads(line) for line in open(tmp_path / "ok.acks.jsonl")]
        assert [a["http"] for a in acks] == [200, 200]
        assert server.status()["version"] == 2
        with pytest.raises(httpx.TransportError):
            httpx.get(server.url.replace("https", "http") + "/status", timeout=5)
    finally:
        server.kill()
