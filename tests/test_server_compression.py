"""Compression and central DP over the network (in process, FastAPI TestClient): compressed
uploads are decoded with validation and fold in exactly what decoding the payload gives; bad
payloads leave the model untouched; bytes are counted; the DP aggregator steps with noise on
the server and reports epsilon."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_client_runtime import in_process_client
from test_server_inputs import Harness, assert_rejected, unchanged

from asyncfl import config, wire
from asyncfl.algorithms.types import ClientUpdate, ServerState
from asyncfl.build import build_aggregator
from asyncfl.compression import ErrorFeedback, decode, parse_codec
from asyncfl.privacy import epsilon
from asyncfl.server.service import FLServer
from asyncfl.server.settings import ServerConfig


def experiment_with(algorithm: dict, scheduler: dict, trainer: dict | None = None, **run) -> config.ExperimentConfig:
    return config.validate(
        {
            "name": "t",
            "seed": 0,
            "data": {"num_clients": 8, "partition": {"kind": "iid"}},
            "model": {"name": "mlp", "hidden": [16]},
            "trainer": trainer or {"lr": 0.1, "batch_size": 16, "local_steps": 2},
            "runs": [{"name": "task1", "algorithm": algorithm, "scheduler": scheduler, **run}],
        }
    )


class CHarness(Harness):
    """Harness for a run with `compression:` / `privacy:` sections (FedBuff, K = 1 by default)."""

    def __init__(self, tmp_path, run: dict, algorithm=None, scheduler=None, trainer=None, **settings):
        self.tmp = tmp_path
        self.cfg = experiment_with(
            algorithm or {"name": "fedbuff", "buffer_size": 1},
            scheduler or {"mode": "async", "concurrency": 4},
            trainer,
            **run,
        )
        self.settings = ServerConfig(
            **(
                {"max_update_norm": 50.0, "max_body_bytes": 64 * 1024, "rate_per_s": 1000, "rate_burst": 1000}
                | settings
            )
        )
        self.open()
        self.tokens = {c: self.mint(c, "task1") for c in "abcdefg"}
        self.sign_in()

    def cframe(self, lease, payload: bytes, codec: str, **header):
        m = self.server.model
        fields = dict(
            lease_id=lease["lease_id"],
            base_version=lease["base_version"],
            idempotency_key=f"k-{np.random.randint(1 << 62)}",
            n_examples=20,
            steps=2,
            loss=1.0,
        )
        return wire.encode_update(
            delta=None, names=m.names, shapes=m.shapes, payload=payload, codec=codec, **(fields | header)
        )

    def weights(self, version: int) -> torch.Tensor:
        return self.server.aggregation.models[version].clone()

    def expected_after(self, w0: torch.Tensor, deltas: list[torch.Tensor]) -> torch.Tensor:
        """What the run's aggregator makes of these (decoded) deltas, computed locally."""
        agg = build_aggregator(self.cfg.runs[0], self.cfg.trainer.lr, num_users=8, seed=self.cfg.seed)
        state = ServerState(w=w0.clone(), version=0)
        for i, d in enumerate(deltas):
            agg.submit(
                state,
                ClientUpdate(client_id=i, base_version=state.version, delta=d, n_examples=20, steps=2, loss=1.0),
                state.w,
            )
        return state.w


def random_delta(n: int, seed: int, scale: float = 0.01) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


# ---- compressed uploads ------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["int8", "topk:0.1+int8"])
def test_compressed_upload_folds_in_exactly_the_decoded_delta(tmp_path, spec):
    ef = spec.startswith("topk")
    with CHarness(tmp_path, {"compression": {"upload": spec, "error_feedback": ef}}) as h:
        codec = parse_codec(spec)
        n = h.server.model.numel
        w0 = h.weights(0)
        store = ErrorFeedback(codec) if ef else None
        decoded_all, payloads = [], []
        for i, client in enumerate("ab"):
            lease = h.checkin(client)
            delta = random_delta(n, i)
            gen = torch.Generator().manual_seed(lease["seed"])
            if store is not None:  # client-side error feedback, as the client runtime keeps it
                payload, _ = store.encode(client, delta, gen)
            else:
                payload = codec.encode(delta, gen)
            body = h.cframe(lease, payload, spec)
            r = h.upload(client, body)
            assert r.status_code == 200 and r.json()["verdict"] == "stepped", r.text
            decoded_all.append(decode(payload, n, expect=codec))  # decoding the same payload locally
            payloads.append(payload)
            assert len(payload) == codec.bytes_for(n)
        assert h.server.aggregation.state.version == 2
        torch.testing.assert_close(h.weights(2), h.expected_after(w0, decoded_all), rtol=0, atol=1e-7)
        assert not torch.equal(h.weights(2), h.weights(0))
        s = h.http.get("/status").json()
        assert s["compression"]["upload_codec"] == spec and s["compression"]["error_feedback"] == ef
        assert s["compression"]["bytes"]["upload_payload_bytes"] == sum(len(p) for p in payloads)
        assert s["compression"]["upload_payload_bytes_per_update"] == codec.bytes_for(n)
        task = h.http.get("/v1/task", headers=h.auth("a")).json()
        assert task["codecs"] == [spec]


def test_canonical_spec_is_accepted_too(tmp_path):
    with CHarness(tmp_path, {"compression": {"upload": "int8"}}) as h:
        lease = h.checkin("a")
        payload = parse_codec("int8").encode(random_delta(h.server.model.numel, 3), 0)
        assert h.upload("a", h.cframe(lease, payload, "int8:chunk=1024")).status_code == 200


def test_wrong_codec_is_422_naming_the_expected_one_and_changes_nothing(tmp_path):
    with CHarness(tmp_path, {"compression": {"upload": "int8"}}) as h:
        n = h.server.model.numel
        lease = h.checkin("a")
        before = h.snapshot()
        # a plain float32 frame, an int4 payload labelled int4, an int4 payload labelled int8
        int4 = parse_codec("int4").encode(random_delta(n, 1), 0)
        r = h.upload("a", h.frame(lease))
        assert_rejected(h, r, 422, "unsupported_codec", "unsupported codec 'none'; this server expects codec 'int8'")
        r = h.upload("a", h.cframe(lease, int4, "int4"))
        assert_rejected(h, r, 422, "unsupported_codec", "expects codec 'int8'")
        r = h.upload("a", h.cframe(lease, int4, "int8"))
        assert_rejected(h, r, 422, "bad_payload", "does not match the expected int8:chunk=1024")
        unchanged(h, before)
        assert h.http.get("/status").json()["rejected"] == {"unsupported_codec": 2, "bad_payload": 1}
        # the lease is still good: a correct upload is accepted afterwards
        ok = parse_codec("int8").encode(random_delta(n, 1), 0)
        assert h.upload("a", h.cframe(lease, ok, "int8")).status_code == 200


def test_truncated_or_inconsistent_payload_is_422_and_changes_nothing(tmp_path):
    with CHarness(tmp_path, {"compression": {"upload": "topk:0.1+int8", "error_feedback": True}}) as h:
        n = h.server.model.numel
        codec = parse_codec("topk:0.1+int8")
        good = codec.encode(random_delta(n, 2), 0)
        other_n = codec.encode(random_delta(n - 10, 2), 0)
        lease = h.checkin("a")
        before = h.snapshot()
        for payload, words in (
            (good[:-7], "truncated payload"),
            (good[:5], "too short for a header"),
            (good + b"\0\0", "trailing bytes"),
            (other_n, "numel mismatch"),
            (b"XX" + good[2:], "bad magic"),
        ):
            r = h.upload("a", h.cframe(lease, payload, "topk:0.1+int8"))
            assert_rejected(h, r, 422, "bad_payload", words)
        # header tensors unlike the model's are refused before the payload is decoded
        m = h.server.model
        body = wire.compressed_frame(
            {
                "kind": "update",
                "lease_id": lease["lease_id"],
                "base_version": 0,
                "idempotency_key": "k-shape-1",
                "n_examples": 20,
                "steps": 2,
            },
            [(m.names[0], (10**6, 64))] + list(zip(m.names[1:], m.shapes[1:])),
            good,
            "topk:0.1+int8",
        )
        assert_rejected(h, h.upload("a", body), 422, "bad_shape", "expected")
        unchanged(h, before)
        assert h.http.get("/status").json()["compression"]["bytes"]["uploads_decoded"] == 0


def test_bytes_received_are_the_real_payload_lengths(tmp_path):
    with CHarness(tmp_path, {"compression": {"upload": "int8"}}) as h:
        n = h.server.model.numel
        lease = h.checkin("a")
        payload = parse_codec("int8").encode(random_delta(n, 5), 0)
        body = h.cframe(lease, payload, "int8")
        assert h.upload("a", body).status_code == 200
        junk = b"not a frame"
        h.upload("a", junk)
        b = h.http.get("/status").json()["compression"]["bytes"]
        assert b["upload_payload_bytes"] == len(payload) == wire.payload_length(body)
        assert b["upload_body_bytes"] == len(body) + len(junk) and b["uploads_decoded"] == 1
        text = h.http.get("/metrics").text
        assert f'asyncfl_received_bytes_total{{part="payload"}} {float(len(payload))}' in text
        assert 'asyncfl_updates_decoded_total{codec="int8"} 1.0' in text


def test_plain_runs_keep_the_raw_frame_byte_for_byte(tmp_path):
    """Without compression (or with upload: none) updates are the float32 frames of before."""
    m_names, shapes = ["w"], [(2, 3)]
    delta = torch.arange(6, dtype=torch.float32)
    body = wire.encode_update(
        lease_id="l",
        base_version=0,
        idempotency_key="key-0001",
        n_examples=1,
        steps=1,
        loss=None,
        delta=delta,
        names=m_names,
        shapes=shapes,
    )
    head = (
        b'{"kind":"update","lease_id":"l","base_version":0,"idempotency_key":"key-0001","n_examples":1,'
        b'"steps":1,"planned_steps":null,"loss":null,"start_loss":null,"codec":"none",'
        b'"tensors":[{"name":"w","shape":[2,3],"dtype":"float32"}]}'
    )
    assert body == wire.MAGIC + len(head).to_bytes(4, "little") + head + delta.numpy().tobytes()
    with CHarness(tmp_path, {"compression": {"upload": "none"}}) as h:
        lease = h.checkin("a")
        body = h.frame(lease)
        assert h.upload("a", body).status_code == 200
        b = h.http.get("/status").json()["compression"]
        assert b["upload_codec"] == "none" and b["bytes"]["upload_payload_bytes"] == 4 * h.server.model.numel


def test_lossy_download_is_encoded_once_per_version_and_decoded_by_the_client(tmp_path):
    with CHarness(tmp_path, {"compression": {"upload": "int8", "download": "int8"}}) as h:
        a = h.http.get("/v1/model/0", headers=h.auth("a")).content
        assert a == h.http.get("/v1/model/0", headers=h.auth("b")).content  # same bytes for everyone
        frame = wire.decode(a, wire.ModelHeader, {"int8:chunk=1024": wire.compressed_decoder(parse_codec("int8"))})
        w = wire.join_flat(frame.arrays)
        w0 = h.weights(0)
        assert frame.header.codec == "int8:chunk=1024" and len(a) < w0.numel() * 4 / 3
        bound = parse_codec("int8").error_bound(w0)
        assert ((w - w0).abs() <= bound + 1e-6).all()
        rt = in_process_client(h, "a", max_trips=1)
        rt.run()
        assert rt.stats["accepted"] == 1


def test_client_runtime_error_feedback_delivers_the_true_sum(tmp_path):
    """topk+int8 with EF through the real client runtime: what the server folded in plus the
    client's residual equals the sum of what the trainer computed (nothing lost, only delayed)."""
    with CHarness(
        tmp_path,
        {"compression": {"upload": "topk:0.1+int8", "error_feedback": True}},
        scheduler={"mode": "async", "concurrency": 1},
    ) as h:
        rt = in_process_client(h, "a", max_trips=3)
        rt.setup()
        true = []
        train = rt.trainer.train

        def recording(*args, **kw):
            u = train(*args, **kw)
            true.append(u.delta.clone())
            return u

        rt.trainer.train = recording
        for _ in range(3):
            assert rt.trip() == "train"
        assert rt.stats["accepted"] == 3 and h.server.aggregation.state.version == 3
        residual = rt.error_feedback.residual("self")
        assert residual is not None and residual.abs().sum() > 0
        # FedBuff K=1, staleness 0, SGD lr 1: w <- w - delta, so the model moved by minus the decoded deltas
        moved = h.weights(0) - h.weights(3)
        torch.testing.assert_close(moved + residual, torch.stack(true).sum(0), rtol=0, atol=1e-5)
        codec = parse_codec("topk:0.1+int8")
        assert rt.upload_payload_bytes == [codec.bytes_for(h.server.model.numel)] * 3


def test_int8_client_runtime_trains_to_modest_accuracy(tmp_path):
    with CHarness(
        tmp_path,
        {"compression": {"upload": "int8"}},
        algorithm={"name": "fedbuff", "buffer_size": 2},
        trainer={"lr": 0.1, "batch_size": 16, "local_steps": 10},
    ) as h:
        runtimes = [in_process_client(h, c) for c in "abcd"]
        for rt in runtimes:
            rt.setup()
        data = h.server.data
        acc = 0.0
        for _ in range(15):
            for rt in runtimes:
                rt.trip()
            acc, _ = h.server.model.evaluate(h.server.aggregation.state.w, data.x_test, data.y_test)
            if acc >= 0.8:
                break
        assert acc >= 0.8, acc
        s = h.http.get("/status").json()
        n = h.server.model.numel
        assert (
            s["rejected"] == {}
            and s["compression"]["upload_payload_bytes_per_update"] == parse_codec("int8").bytes_for(n) < 4 * n / 3.5
        )


# ---- central DP on the server -------------------------------------------------------------


def dp_run(seed: int) -> dict:
    return {"privacy": {"clip_norm": 0.5, "noise_multiplier": 1.0, "sample_rate": 0.1, "noise_seed": seed}}


def dp_uploads(h, rounds: range):
    """Two users per aggregate (FedBuff K = 2), the same deltas whatever the server."""
    n = h.server.model.numel
    for r in rounds:
        for i, client in enumerate("ab"):
            lease = h.checkin(client)
            resp = h.upload(client, h.frame(lease, delta=random_delta(n, 10 * r + i, 0.05)))
            assert resp.status_code == 200, resp.text


def test_dp_server_steps_with_noise_and_reports_epsilon(tmp_path):
    algo = {"name": "fedbuff", "buffer_size": 2}
    models = {}
    for seed in (1, 2):
        with CHarness(tmp_path / f"s{seed}", dp_run(seed), algorithm=algo) as h:
            dp_uploads(h, range(3))
            s = h.http.get("/status").json()
            assert s["version"] == 3
            p = s["privacy"]
            assert p["privacy_steps"] == 3 and p["sample_rate"] == 0.1 and p["delta"] == 1e-5
            assert p["epsilon"] == pytest.approx(epsilon(1.0, 0.1, 3, 1e-5), rel=1e-9)
            assert p["noise_std_per_step"] == pytest.approx(1.0 * 0.5 / 2)
            text = h.http.get("/metrics").text
            assert f"asyncfl_privacy_epsilon {p['epsilon']!r}" in text and "asyncfl_privacy_steps_total 3.0" in text
            models[seed] = h.weights(3)
    diff = models[1] - models[2]
    # different noise seeds, same uploads: the models differ by noise of std ~ sqrt(3 * 2) * sigma C / K
    assert diff.abs().max() > 0.1 and 0.5 < float(diff.std()) / (math.sqrt(6) * 0.25) < 1.5


def test_dp_state_survives_a_restart(tmp_path):
    """Noise generator, accountant and buffer are persisted with the aggregator's state: a run
    restarted mid-buffer ends exactly where an uninterrupted one does."""
    algo = {"name": "fedbuff", "buffer_size": 2}
    with CHarness(tmp_path / "straight", dp_run(7), algorithm=algo) as straight:
        dp_uploads(straight, range(2))
        want, want_eps = straight.weights(2), straight.http.get("/status").json()["privacy"]["epsilon"]
    with CHarness(tmp_path / "restarted", dp_run(7), algorithm=algo) as h:
        dp_uploads(h, range(1))
        lease = h.checkin("a")  # half a buffer, then a restart
        assert h.upload("a", h.frame(lease, delta=random_delta(h.server.model.numel, 10, 0.05))).status_code == 200
        h.close()
        h.open()
        assert h.http.get("/status").json()["buffer"]["fill"] == 1
        lease = h.checkin("b")
        assert h.upload("b", h.frame(lease, delta=random_delta(h.server.model.numel, 11, 0.05))).status_code == 200
        s = h.http.get("/status").json()
        assert s["version"] == 2 and s["privacy"]["epsilon"] == want_eps
        assert torch.equal(h.weights(2), want)


def test_dp_without_sample_rate_is_a_config_error_at_serve_start(tmp_path, capsys):
    cfg = experiment_with(
        {"name": "fedbuff", "buffer_size": 2},
        {"mode": "async", "concurrency": 4},
        privacy={"clip_norm": 1.0, "noise_multiplier": 1.0},
    )
    with pytest.raises(config.ConfigError, match="privacy.sample_rate is required by `asyncfl serve`"):
        FLServer(cfg, ServerConfig(), tmp_path / "state")
    assert not (tmp_path / "state").exists()  # refused before touching the state dir
    from asyncfl.cli import main

    path = tmp_path / "dp.yaml"
    path.write_text(
        "runs: [{name: x, algorithm: {name: fedbuff, buffer_size: 2}, "
        "privacy: {clip_norm: 1.0, noise_multiplier: 1.0}}]\n"
    )
    assert main(["serve", "--config", str(path), "--state-dir", str(tmp_path / "state")]) == 2
    assert "privacy.sample_rate is required" in capsys.readouterr().err
