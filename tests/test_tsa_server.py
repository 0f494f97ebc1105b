"""The TSA over HTTP and a server with masked FedBuff buffers, in process (FastAPI TestClient):
masked uploads step the model by the plaintext FedBuff step within the encoding bound; malformed
masked frames are refused like any frame; the TSA refuses K - 1 contributions, a replayed seed,
a forged id and a tampered ciphertext, and the server's buffer waits through a refusal and a
restart without losing anything."""

from __future__ import annotations

import dataclasses
import os
import stat

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from test_server_compression import CHarness, random_delta
from test_server_inputs import assert_rejected

from asyncfl.client.masking import tsa_masking
from asyncfl.privacy import epsilon
from asyncfl.secagg import SqliteStore, TrustedAggregator
from asyncfl.secagg.crypto import to_base64
from asyncfl.secagg.messages import TsaRequest, to_json
from asyncfl.server.tsa_buffer import LEVELS
from asyncfl.server.tsa_link import TsaRefused
from asyncfl.tsa.app import create_tsa_app
from asyncfl.tsa.state import init_state, load_key_pair

K = 3
TOKEN = "t" * 32


class TsaHarness(CHarness):
    """A FedBuff (K = 3) server whose uploads are masked for an in-process TSA."""

    def __init__(self, tmp_path, min_contributions=K, tsa_state=None, **run):
        self.tsa_state = tsa_state or tmp_path / "tsa"
        if not (self.tsa_state / "tsa.key").exists():
            init_state(self.tsa_state)
        (tmp_path / "token").write_text(TOKEN)
        self.min_contributions = min_contributions
        key = to_base64(load_key_pair(self.tsa_state).public_bytes())
        super().__init__(
            tmp_path,
            {"secure_aggregation": {"protocol": "tsa", "clip_range": 0.5}} | run,
            algorithm={"name": "fedbuff", "buffer_size": K},
            tsa_url="http://tsa",
            tsa_public_key=key,
            tsa_token_file=str(tmp_path / "token"),
        )

    def open(self, background=False):
        super().open(background)
        self.tsa = self.tsa_process(self.min_contributions)
        self.server.unmasker.link.http = self.tsa

    def tsa_process(self, min_contributions):
        """The TSA app on this harness's state dir (a restart of the TSA process, in process)."""
        t = self.server.tsa.terms
        store = SqliteStore(self.tsa_state / "used.db")
        key = load_key_pair(self.tsa_state)
        tsa = TrustedAggregator(
            key, store, "task1", t.length, min_contributions, t.max_weight, t.bits, t.noise_std_in_ring
        )
        return TestClient(create_tsa_app(tsa, TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})

    def masked_upload(self, client, delta, lease=None):
        lease = lease or self.checkin(client)
        task = self.http.get("/v1/task", headers=self.auth(client)).json()
        masking = tsa_masking(task, task["secure_aggregation"]["tsa_public_key"])
        return self.upload(
            client, self.cframe(lease, masking.payload(delta, lease["seed"], lease["lease_id"]), masking.spec)
        )

    def status(self):
        return self.http.get("/status").json()


def plain_fedbuff_step(w0, deltas, clip):
    """FedBuff's first step (staleness 0, uniform weights, server SGD lr 1): the mean delta."""
    return w0 - torch.stack([d.clamp(-clip, clip) for d in deltas]).mean(0)


def test_masked_uploads_step_by_the_plaintext_fedbuff_step(tmp_path):
    with TsaHarness(tmp_path) as h:
        n, w0 = h.server.model.numel, h.weights(0)
        deltas = [random_delta(n, i, 0.3) for i in range(K)]
        for client, delta in zip("abc", deltas):
            r = h.masked_upload(client, delta)
            assert r.status_code == 200 and r.json()["verdict"] == "buffered", r.text
        s = h.status()
        assert s["version"] == 0 and s["secure_aggregation"]["waiting_buffers"] == 1
        assert s["updates"]["buffered"] == K and h.http.get("/metrics").status_code == 200
        stored = h.server.aggregation.aggregator.closed[0].total
        assert h.server.unmasker.step_once()
        s = h.status()
        assert s["version"] == 1 and s["secure_aggregation"] == {
            "protocol": "tsa",
            "waiting_buffers": 0,
            "tsa_refusal": None,
        }
        codec = h.server.tsa.terms.codec
        bound = codec.error_bound(K * LEVELS) / (K * LEVELS) + 1e-6  # float32 model
        expected = plain_fedbuff_step(w0, deltas, 0.5)
        assert (h.weights(1) - expected).abs().max() <= bound
        # what the server held decodes to noise, nowhere near the weighted sum it hides
        plain = sum(LEVELS * d.double().clamp(-0.5, 0.5) for d in deltas).numpy()
        assert np.abs(codec.decode(stored, K * LEVELS) - plain).mean() > 10


def test_malformed_masked_frames_are_refused_and_change_nothing(tmp_path):
    with TsaHarness(tmp_path) as h:
        lease = h.checkin("a")
        task = h.http.get("/v1/task", headers=h.auth("a")).json()
        spec = task["secure_aggregation"]["codec"]
        assert task["codecs"] == [spec] and task["secure_aggregation"]["bits"] == 32
        before = h.snapshot()
        payload = tsa_masking(task, task["secure_aggregation"]["tsa_public_key"]).payload(
            random_delta(h.server.model.numel, 0), lease["seed"], lease["lease_id"]
        )
        assert_rejected(h, h.upload("a", h.cframe(lease, payload[:-1], spec)), 422, "bad_payload", "sealed seed")
        assert_rejected(h, h.upload("a", h.cframe(lease, payload + b"x", spec)), 422, "bad_payload", "bytes")
        assert_rejected(h, h.upload("a", h.frame(lease)), 422, "unsupported_codec", spec)
        assert_rejected(h, h.upload("a", h.cframe(lease, payload, "int8")), 422, "unsupported_codec", spec)
        body = h.cframe(lease, payload, spec)
        assert h.upload("a", body[: len(body) // 2]).status_code in (400, 422)
        assert h.snapshot() == before


def test_tsa_http_refusals_and_exact_retry(tmp_path):
    with TsaHarness(tmp_path) as h:
        for client, seed in zip("abc", range(K)):
            assert h.masked_upload(client, random_delta(h.server.model.numel, seed)).status_code == 200
        request = h.server.aggregation.aggregator.pending_request()
        tsa = h.tsa

        def post(req, **kw):
            return tsa.post("/v1/unmask", json=to_json(req), **kw)

        assert post(request, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert tsa.post("/v1/unmask", content=b"{not json").status_code == 400
        assert tsa.post("/v1/unmask", json={"step_id": "s"}).status_code == 400
        few = dataclasses.replace(request, step_id="few", contributions=request.contributions[:-1])
        assert_rejected(h, post(few), 422, "too_few_contributions", f"at least {K}")
        first = request.contributions[0]
        forged = (dataclasses.replace(first, update_id="someone-else"), *request.contributions[1:])
        assert_rejected(h, post(TsaRequest("forged", request.length, forged)), 422, "unauthenticated_contribution", "")
        sealed = bytearray(first.sealed_seed)
        sealed[-1] ^= 1
        tampered = (dataclasses.replace(first, sealed_seed=bytes(sealed)), *request.contributions[1:])
        assert_rejected(
            h, post(TsaRequest("tampered", request.length, tampered)), 422, "unauthenticated_contribution", ""
        )
        heavy = (dataclasses.replace(first, weight=LEVELS + 1), *request.contributions[1:])
        assert_rejected(h, post(TsaRequest("heavy", request.length, heavy)), 422, "weight_out_of_range", "")
        answer = post(request)
        assert answer.status_code == 200 and post(request).json() == answer.json()  # an exact retry
        replay = TsaRequest("replay", request.length, request.contributions)
        assert_rejected(h, post(replay), 422, "replayed_contribution", "used before")
        assert h.server.unmasker.step_once()  # the server's own (identical) request gets the same answer
        assert h.status()["version"] == 1


def test_the_binary_answer_is_the_json_answer(tmp_path):
    with TsaHarness(tmp_path) as h:
        for client, seed in zip("abc", range(K)):
            assert h.masked_upload(client, random_delta(h.server.model.numel, seed)).status_code == 200
        request = h.server.aggregation.aggregator.pending_request()
        binary = h.server.unmasker.link.unmask(request)  # what the server asks for: raw bytes
        as_json = h.tsa.post("/v1/unmask", json=to_json(request)).json()  # an exact retry
        assert as_json == to_json(binary) and len(binary.mask_sum) == 4 * h.server.model.numel


def test_a_refused_buffer_waits_and_steps_once_the_tsa_agrees(tmp_path):
    with TsaHarness(tmp_path, min_contributions=K + 1) as h:  # a TSA configured with another K
        n, agg = h.server.model.numel, h.server.aggregation.aggregator
        leases = {client: h.checkin(client) for client in "abcd"}
        for seed, client in enumerate("abc"):
            assert h.masked_upload(client, random_delta(n, seed), leases[client]).status_code == 200
        with pytest.raises(TsaRefused, match="too_few_contributions"):
            h.server.unmasker.step_once()
        s = h.status()
        assert s["version"] == 0 and s["secure_aggregation"]["waiting_buffers"] == 1
        assert "too_few_contributions" in s["secure_aggregation"]["tsa_refusal"]
        leases |= {client: h.checkin(client) for client in "ef"}  # one waiting buffer: trips go on
        for seed, client in enumerate("def", start=K):
            assert h.masked_upload(client, random_delta(n, seed), leases[client]).status_code == 200
        # they step from version 1 (after the waiting buffer): staleness 1, weight 100/sqrt(2)
        assert [c.weight for c in agg.closed[1].contributions] == [round(LEVELS / 2**0.5)] * K
        r = h.http.post("/v1/checkin", headers=h.auth("g"), json={"eligible": True})
        assert r.json()["action"] == "retry" and "TSA" in r.json()["reason"]  # two waiting: no new trips
        h.server.unmasker.link.http = h.tsa_process(K)  # the TSA restarted with the right K
        assert h.server.unmasker.step_once()
        s = h.status()
        assert s["version"] == 1 and s["secure_aggregation"] == {
            "protocol": "tsa",
            "waiting_buffers": 1,
            "tsa_refusal": None,
        }
        assert h.checkin("g")["action"] == "train"
        assert h.server.unmasker.step_once() and h.status()["version"] == 2


def test_an_answered_but_uncommitted_step_is_requested_again_after_a_restart(tmp_path):
    with TsaHarness(tmp_path) as h:
        n, w0 = h.server.model.numel, h.weights(0)
        deltas = [random_delta(n, i, 0.3) for i in range(K)]
        for client, delta in zip("abc", deltas):
            assert h.masked_upload(client, delta).status_code == 200
        request = h.server.aggregation.aggregator.pending_request()
        first = h.server.unmasker.link.unmask(request)  # the TSA claimed and answered; the server "crashes"
        h.close()
        h.open()  # same state dirs: the server restores its closed buffer, the TSA its claims
        assert h.server.aggregation.aggregator.pending_request() == request
        assert h.server.unmasker.link.unmask(request) == first
        assert h.server.unmasker.step_once()
        assert (h.weights(1) - plain_fedbuff_step(w0, deltas, 0.5)).abs().max() < 1e-5


def test_tsa_init_keeps_the_private_key_private(tmp_path):
    public = init_state(tmp_path / "tsa")
    assert len(__import__("base64").b64decode(public)) == 32
    assert stat.S_IMODE(os.stat(tmp_path / "tsa").st_mode) == 0o700
    assert stat.S_IMODE(os.stat(tmp_path / "tsa" / "tsa.key").st_mode) == 0o600
    with pytest.raises(Exception, match="already has a key pair"):
        init_state(tmp_path / "tsa")


def test_client_pins_the_tsa_key():
    task = {"task": "t", "secure_aggregation": {"protocol": "tsa", "codec": "tsa-masked-32", "bits": 32}}
    task["secure_aggregation"] |= {"clip_range": 1.0, "max_total_weight": 10, "tsa_public_key": to_base64(b"k" * 32)}
    with pytest.raises(ValueError, match="--tsa-key"):
        tsa_masking(task, None)
    with pytest.raises(ValueError, match="not the pinned"):
        tsa_masking(task, to_base64(b"x" * 32))
    assert tsa_masking(task, to_base64(b"k" * 32)).spec == "tsa-masked-32"
    assert tsa_masking({"task": "t"}, None) is None


def test_uploads_the_server_stores_do_not_depend_on_the_update(tmp_path):
    """The server's frame reader keeps the masked vector; two very different updates masked
    many times cannot be told apart by a two-sample KS test (see test_secagg_independence)."""
    from scipy import stats

    with TsaHarness(tmp_path) as h:
        lease = h.checkin("a")
        task = h.http.get("/v1/task", headers=h.auth("a")).json()
        masking = tsa_masking(task, task["secure_aggregation"]["tsa_public_key"])
        frames, ring = h.server.tsa.frames, masking.codec.ring
        n = h.server.model.numel

        def stored(value, trial):
            body = h.cframe(lease, masking.payload(torch.full((n,), value), trial, lease["lease_id"]), masking.spec)
            upload = frames.check(body, h.server.aggregation._check_specs).masked
            return ring.from_bytes(upload.masked)[:64].astype(np.float64)

        low = np.concatenate([stored(-0.5, t) for t in range(100)])
        high = np.concatenate([stored(0.5, t) for t in range(100)])
        assert stats.ks_2samp(low, high).pvalue > 1e-4
        assert abs(low.mean() / 2**32 - 0.5) < 0.02
        plain = [masking.codec.encode(np.full(64, v), np.random.default_rng(0)).astype(np.float64) for v in (-0.5, 0.5)]
        assert stats.ks_2samp(*plain).pvalue < 1e-4


def test_with_dp_the_tsa_adds_the_noise_and_the_server_accounts_it(tmp_path):
    privacy = {"noise_multiplier": 1.0, "clip_norm": 0.5, "sample_rate": 0.1}
    with TsaHarness(tmp_path, privacy=privacy) as h:
        n, w0 = h.server.model.numel, h.weights(0)
        deltas = [random_delta(n, i, 0.3) for i in range(K)]  # L2 norm ~10: the client clips to 0.5
        for client, delta in zip("abc", deltas):
            assert h.masked_upload(client, delta).status_code == 200
        assert h.server.unmasker.step_once()
        clipped = [d * min(1.0, 0.5 / float(d.norm())) for d in deltas]
        noise = (plain_fedbuff_step(w0, clipped, 0.5) - h.weights(1)).double()
        want = 1.0 * 0.5 / K  # sigma C / K, as plaintext DP-FedBuff's step
        assert abs(float(noise.std()) / want - 1) < 0.1 and abs(float(noise.mean())) < 4 * want / n**0.5
        report = h.status()["privacy"]
        assert report["privacy_steps"] == 1 and report["noise_added_by"] == "tsa"
        assert report["epsilon"] == pytest.approx(epsilon(1.0, 0.1, 1, 1e-5))


def test_adaptive_clipping_and_missing_tsa_terms_are_refused_by_serve(tmp_path):
    """(Quantized uploads compose with the masking: test_quantized_uploads_compose_with_the_masking;
    top-k is a config error, tests/test_secagg_config.py.)"""
    from asyncfl.config import ConfigError

    init_state(tmp_path / "tsa")
    settings = {"tsa_url": "http://tsa", "tsa_public_key": to_base64(b"k" * 32)}
    adaptive = {"noise_multiplier": 0.0, "clip_norm": 1.0, "sample_rate": 0.1, "adaptive": {}}
    for extra, server, words in (
        ({"privacy": adaptive}, {}, "adaptive clipping needs every update's norm"),
        ({}, {"tsa_public_key": "bm90IGEga2V5"}, "must be the base64 X25519 key"),
        ({}, {"tsa_url": None}, "needs server.tsa_url"),
    ):
        with pytest.raises(ConfigError, match=words):
            run = {"secure_aggregation": {"protocol": "tsa", "clip_range": 0.5}} | extra
            CHarness(tmp_path, run, **(settings | server))


def test_tsa_cli_prints_the_public_key_and_serve_needs_its_terms(tmp_path, capsys, monkeypatch):
    from asyncfl.cli import main
    from asyncfl.tsa.state import public_key

    assert main(["tsa", "init", "--state", str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.strip() == public_key(tmp_path / "s")
    assert main(["tsa", "init", "--state", str(tmp_path / "s")]) == 2  # never overwrites a key
    monkeypatch.setenv("ASYNCFL_TSA_TOKEN", "t" * 32)
    assert main(["tsa", "serve", "--state", str(tmp_path / "s"), "--task", "t"]) == 2
    assert "give --config, or --length --min-contributions --max-weight" in capsys.readouterr().err


def test_quantized_uploads_compose_with_the_masking(tmp_path):
    """int8 uploads under the TSA: the client quantizes (stochastic rounding from the lease's
    seed), then clips, encodes and masks the quantized values; the server steps by the plaintext
    step of what was quantized, and a real client runtime's trips are accepted."""
    from test_client_runtime import in_process_client

    from asyncfl.algorithms.seeds import upload_rounding_generator
    from asyncfl.compression import encode_upload, parse_codec

    with TsaHarness(tmp_path, compression={"upload": "int8"}) as h:
        n, w0 = h.server.model.numel, h.weights(0)
        codec, quantized = parse_codec("int8"), []
        for client, i in zip("abc", range(K)):
            lease = h.checkin(client)
            values = encode_upload(codec, random_delta(n, i, 0.3), upload_rounding_generator(lease["seed"])).decoded
            quantized.append(values)
            assert h.masked_upload(client, values, lease).status_code == 200
        assert h.server.unmasker.step_once()
        bound = h.server.tsa.terms.codec.error_bound(K * LEVELS) / (K * LEVELS) + 1e-6
        assert (h.weights(1) - plain_fedbuff_step(w0, quantized, 0.5)).abs().max() <= bound
        key = h.http.get("/v1/task", headers=h.auth("d")).json()["secure_aggregation"]["tsa_public_key"]
        rt = in_process_client(h, "d", max_trips=2, idle_wait=0.01, tsa_key=key)
        assert rt.run()["accepted"] == 2 and rt.upload_codec is not None
