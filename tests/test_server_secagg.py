"""Synchronous SecAgg / SecAgg+ over HTTP, in process: parties driven phase by phase through the
real endpoints (FastAPI TestClient), a fake clock for the phase deadlines. The model after a
round must be the FedAvg mean of the survivors' updates within the encoding bound; dropouts
after advertising, after sharing keys and after uploading are recovered up to n - t, and a
round beyond that fails cleanly; malformed messages are refused with 4xx and change nothing;
the masked input the server holds does not reveal the update."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from asyncfl import config
from asyncfl.algorithms.types import ClientUpdate, ServerState
from asyncfl.build import build_aggregator
from asyncfl.client.secure import secure_values
from asyncfl.secagg import FixedPointCodec, Ring, SecAggClient
from asyncfl.secagg.messages import IncomingShares, KeyDirectory, RoundParams, UnmaskRequest, from_json, to_json
from asyncfl.server.app import create_app
from asyncfl.server.auth import CLIENT, new_token
from asyncfl.server.service import FLServer
from asyncfl.server.settings import ServerConfig

CLIP = 0.5
MAX_EXAMPLES = 100


def experiment(
    protocol: str, cohort: int, threshold: float, neighbours: int | None = None, algorithm: dict | None = None
) -> config.ExperimentConfig:
    secure = {"protocol": protocol, "clip_range": CLIP, "threshold": threshold}
    if neighbours is not None:
        secure["neighbours"] = neighbours
    return config.validate(
        {
            "name": "t",
            "seed": 0,
            "data": {"num_clients": 8, "partition": {"kind": "iid"}},
            "model": {"name": "mlp", "hidden": [16]},
            "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 2},
            "runs": [
                {
                    "name": "task1",
                    "algorithm": (algorithm or {"name": "fedavg"}) | {"server_opt": {"name": "sgd", "lr": 1.0}},
                    "scheduler": {"mode": "sync", "concurrency": cohort, "round_timeout": 30},
                    "secure_aggregation": secure,
                }
            ],
        }
    )


class FakeClock:
    """Starts at the monotonic clock (timers set while the server opened stay in reach) and
    moves only when told."""

    def __init__(self):
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


class Harness:
    """A server in process whose coordinator runs on a fake clock, and parties that each hold a
    lease and a SecAggClient."""

    def __init__(
        self,
        tmp_path,
        protocol="secagg",
        cohort=5,
        threshold=0.6,
        neighbours=None,
        phase_timeout=5.0,
        algorithm=None,
        max_examples=MAX_EXAMPLES,
    ):
        self.cfg = experiment(protocol, cohort, threshold, neighbours, algorithm)
        settings = ServerConfig(
            max_examples=max_examples, rate_per_s=1000, rate_burst=1000, secagg_phase_timeout=phase_timeout
        )
        self.state = tmp_path / "state"
        self.settings = settings
        self.open()
        self.tokens = {}
        for name in "abcdefgh":
            self.tokens[name] = new_token()
            self.server.store.create_token(self.tokens[name], name, "task1", CLIENT)

    def open(self):
        self.server = FLServer(self.cfg, self.settings, self.state)
        self.clock = FakeClock()
        self.server.coordinator.clock = self.clock
        self.http = TestClient(create_app(self.server, background=False))
        self.http.__enter__()

    def close(self):
        self.http.__exit__(None, None, None)

    def request(self, method, path, name, **kw):
        return self.http.request(method, path, headers={"Authorization": f"Bearer {self.tokens[name]}"}, **kw)

    def after(self, seconds: float) -> None:
        """Let `seconds` pass and fire what is due."""
        self.clock.now += seconds
        self.server.tick()

    def status(self) -> dict:
        return self.server.status()

    @property
    def length(self) -> int:
        return self.server.model.numel


class Party:
    """One client: checks in, joins the round, and sends each phase's message on request."""

    def __init__(self, h: Harness, name: str, update: np.ndarray, weight: int, steps: int = 1, extras=None):
        self.h, self.name, self.update, self.weight, self.steps = h, name, update, weight, steps
        self.extras = extras
        lease = h.request("POST", "/v1/checkin", name, json={"eligible": True}).json()
        assert lease["action"] == "train", lease
        self.lease = lease
        self.view = self.get()
        self.round = self.view["round"]
        self.params = from_json(RoundParams, self.view["params"])
        self.secagg = SecAggClient(self.params, self.view["client"])
        enc = self.view["encoding"]
        self.codec = FixedPointCodec(enc["clip_range"], enc["max_total_weight"], Ring(self.params.bits))

    def get(self, **query):
        resp = self.h.request("GET", "/v1/secagg/round", self.name, params={"lease_id": self.lease["lease_id"]} | query)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def post(self, endpoint: str, fields: dict):
        body = {"lease_id": self.lease["lease_id"]} | {k: to_json(v) for k, v in fields.items()}
        return self.h.request("POST", f"/v1/secagg/{self.round}/{endpoint}", self.name, json=body)

    def ok(self, endpoint: str, fields: dict):
        resp = self.post(endpoint, fields)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def advertise(self):
        keys = self.secagg.advertise()
        return self.ok("advertise", {"cipher_key": keys.cipher_key, "mask_key": keys.mask_key})

    def share(self):
        directory = from_json(KeyDirectory, self.get()["directory"])
        return self.ok("shares", {"ciphertexts": self.secagg.share_keys(directory).ciphertexts})

    def masked(self):
        incoming = from_json(IncomingShares, self.get()["incoming"])
        vector = secure_values(self.update, self.steps, self.view["encoding"], self.extras)
        encoded = self.codec.encode(vector, np.random.default_rng(7))
        message = self.secagg.masked_input(
            incoming, encoded, 1 if self.view["encoding"]["unit_weight"] else self.weight
        )
        return self.ok("masked", {"weight": message.weight, "masked": message.masked})

    def unmask(self):
        request = from_json(UnmaskRequest, self.get()["unmask_request"])
        reply = self.secagg.unmask(request)
        return self.ok("unmask", {"self_mask_shares": reply.self_mask_shares, "key_shares": reply.key_shares})


def parties(h: Harness, n: int, seed: int = 0) -> list[Party]:
    rng = np.random.default_rng(seed)
    return [
        Party(h, name, rng.uniform(-CLIP, CLIP, h.length), int(rng.integers(1, MAX_EXAMPLES)))
        for name in "abcdefgh"[:n]
    ]


def fedavg_delta(ps: list[Party]) -> np.ndarray:
    weights = np.array([p.weight for p in ps], dtype=np.float64)
    return sum(w * p.update for w, p in zip(weights, ps)) / weights.sum()


def model_delta(h: Harness, w0: torch.Tensor) -> np.ndarray:
    return (w0 - h.server.aggregation.state.w).double().numpy()


def bound(h: Harness, ps: list[Party]) -> float:
    """The encoding's error bound on a mean of these parties' updates, plus float32 rounding."""
    total = sum(p.weight for p in ps)
    return h.server.secure_rounds.codec.error_bound(total) / total + 1e-6


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    yield h
    h.close()


def test_full_round_steps_with_the_fedavg_mean(harness):
    h = harness
    w0 = h.server.aggregation.state.w.clone()
    ps = parties(h, 5)
    for step in ("advertise", "share", "masked", "unmask"):
        for p in ps:
            getattr(p, step)()
    assert h.server.aggregation.state.version == 1
    err = np.abs(model_delta(h, w0) - fedavg_delta(ps)).max()
    assert err < bound(h, ps)
    sa = h.status()["secure_aggregation"]
    assert sa["completed_rounds"] == 1 and sa["failed_rounds"] == {}
    assert sa["last_round"]["survivors"] == 5 and sa["last_round"]["total_weight"] == sum(p.weight for p in ps)
    for p in ps:
        assert p.get()["outcome"] == {"status": "accepted", "version": 1}
    assert h.status()["round"]["number"] == 2 and h.status()["leases"]["ended"]["done"] == 5


@pytest.mark.parametrize("phase", ["advertise", "share", "masked", "unmask"])
@pytest.mark.parametrize("vanish", [2, 3])
def test_dropouts_recover_up_to_n_minus_t_and_fail_cleanly_beyond(tmp_path, phase, vanish):
    """n = 5, t = 3 (secagg, all pairs): `vanish` clients stop just before `phase`."""
    h = Harness(tmp_path)
    try:
        w0 = h.server.aggregation.state.w.clone()
        ps = parties(h, 5)
        order = ["advertise", "share", "masked", "unmask"]
        alive = list(ps)
        for step in order:
            if step == phase:
                alive = alive[vanish:]
            for p in alive:
                getattr(p, step)()
            if step == phase:
                h.after(31 if step == "advertise" else 6)  # the phase's deadline passes
            if h.status()["secure_aggregation"]["phase"] in (None, "advertise"):
                break  # the round ended (failed, or stepped and the next one started)
        sa = h.status()["secure_aggregation"]
        # a client that vanished after uploading is still in the sum: its neighbours reveal its seed
        counted = ps if phase == "unmask" else ps[vanish:]
        if vanish <= 2:
            assert sa["completed_rounds"] == 1 and h.server.aggregation.state.version == 1
            assert sa["last_round"]["survivors"] == len(counted)
            assert np.abs(model_delta(h, w0) - fedavg_delta(counted)).max() < bound(h, counted)
        else:
            failed_in = {"advertise": "advertise", "share": "share_keys", "masked": "masked_input", "unmask": "unmask"}
            assert sa["completed_rounds"] == 0 and sa["failed_rounds"] == {failed_in[phase]: 1}
            assert h.server.aggregation.state.version == 0
            assert torch.equal(h.server.aggregation.state.w, w0)
            assert sa["last_round"]["status"] == "aborted" and sa["last_round"]["needed"] == 3
            assert h.status()["round"]["number"] == 2 and h.status()["round"]["open"]  # the next round started
            assert ps[-1].get()["outcome"]["status"] == "aborted"
            metrics = h.server.metrics_text()
            assert f'asyncfl_secagg_rounds_total{{outcome="failed",phase="{failed_in[phase]}"}} 1.0' in metrics
    finally:
        h.close()


def test_a_round_nobody_joined_starts_again_without_counting_a_failure(harness):
    h = harness
    h.after(31)
    assert h.status()["round"]["number"] == 2 and h.status()["secure_aggregation"]["failed_rounds"] == {}
    ps = parties(h, 5)
    for step in ("advertise", "share", "masked", "unmask"):
        for p in ps:
            getattr(p, step)()
    assert h.server.aggregation.state.version == 1


def test_secagg_plus_sparse_graph_round(tmp_path):
    h = Harness(tmp_path, protocol="secagg_plus", cohort=7, threshold=0.6, neighbours=4)
    try:
        w0 = h.server.aggregation.state.w.clone()
        ps = parties(h, 7, seed=3)
        for step in ("advertise", "share", "masked"):
            for p in ps:
                getattr(p, step)()
        for p in ps[1:]:  # one vanishes after uploading: its masks are rebuilt from its 4 neighbours' shares
            p.unmask()
        h.after(6)
        assert h.status()["secure_aggregation"]["neighbours"] == 4
        assert np.abs(model_delta(h, w0) - fedavg_delta(ps)).max() < bound(h, ps)
    finally:
        h.close()


def test_fednova_steps_with_its_normalized_average(tmp_path):
    """Clients with different local work: the server's step equals FedNova's on the plaintext
    updates (fed to a fresh FedNova aggregator), from the secure sum of d_i / a_i and a_i."""
    h = Harness(tmp_path, algorithm={"name": "fednova", "mu": 0.01})
    try:
        w0 = h.server.aggregation.state.w.clone()
        rng = np.random.default_rng(5)
        ps = [
            Party(h, name, rng.uniform(-CLIP, CLIP, h.length), int(rng.integers(1, MAX_EXAMPLES)), steps)
            for name, steps in zip("abcde", (1, 2, 5, 9, 20))
        ]
        assert ps[0].view["encoding"]["local_work"]["mu"] == 0.01 and ps[0].params.length == h.length + 1
        for step in ("advertise", "share", "masked", "unmask"):
            for p in ps:
                getattr(p, step)()
        spec = h.cfg.runs[0]
        reference = build_aggregator(spec, h.cfg.trainer.lr)
        state = ServerState(w=w0.clone(), version=0)
        for p in ps:
            update = ClientUpdate(0, 0, torch.from_numpy(p.update).float(), p.weight, p.steps, 0.5)
            reference.submit(state, update, w0)
        assert reference.flush(state)
        expected = (w0 - state.w).double().numpy()
        assert np.abs(model_delta(h, w0) - expected).max() < 1e-4
        assert np.abs(expected - fedavg_delta(ps)).max() > 1e-2  # FedNova's step is not FedAvg's here
    finally:
        h.close()


def test_scaffold_steps_x_and_c_as_on_plaintext(tmp_path):
    """SCAFFOLD's clients send [delta_i, dc_i] with weight 1: the server's model and control
    variate after the round equal a fresh ScaffoldAggregator's on the plaintext updates."""
    from asyncfl.algorithms.scaffold import CONTROL_DELTA

    h = Harness(tmp_path, algorithm={"name": "scaffold"})
    try:
        w0 = h.server.aggregation.state.w.clone()
        rng = np.random.default_rng(9)
        ps = [
            Party(
                h, name, rng.uniform(-CLIP, CLIP, h.length), 50, 1, {CONTROL_DELTA: rng.uniform(-CLIP, CLIP, h.length)}
            )
            for name in "abcde"
        ]
        assert ps[0].params.length == 2 * h.length and ps[0].view["encoding"]["max_weight"] == 1
        for step in ("advertise", "share", "masked", "unmask"):
            for p in ps:
                getattr(p, step)()
        reference = build_aggregator(h.cfg.runs[0], h.cfg.trainer.lr, num_users=8)
        state = ServerState(w=w0.clone(), version=0)
        for p in ps:
            dc = {CONTROL_DELTA: torch.from_numpy(p.extras[CONTROL_DELTA]).float()}
            reference.submit(state, ClientUpdate(0, 0, torch.from_numpy(p.update).float(), 50, 1, 0.5, extras=dc), w0)
        assert reference.flush(state)
        served = h.server.aggregation.aggregator
        assert np.abs(model_delta(h, w0) - (w0 - state.w).double().numpy()).max() < 1e-5
        assert (served.control - reference.control).abs().max() < 1e-5
        assert reference.control.abs().max() > 1e-2
    finally:
        h.close()


def test_malformed_messages_are_refused_and_change_nothing(harness):
    h = harness
    ps = parties(h, 5)
    p = ps[0]
    r = h.server.secure_rounds.current

    def refused(status, code, endpoint, body, raw=None):
        before = [dict(x) for x in r.received], r.phase
        if raw is not None:
            resp = h.request("POST", f"/v1/secagg/{p.round}/{endpoint}", p.name, content=raw)
        else:
            resp = h.request("POST", f"/v1/secagg/{p.round}/{endpoint}", p.name, json=body)
        assert resp.status_code == status, resp.text
        assert resp.json()["error"] == code and resp.json()["detail"]
        assert ([dict(x) for x in r.received], r.phase) == before
        return resp.json()

    lease = p.lease["lease_id"]
    good_key = to_json(bytes(32))
    refused(413, "too_large", "advertise", None, raw=b" " * (4096 + 512 * 5 + 1))  # 4 KiB + 512 per slot
    refused(400, "malformed", "advertise", None, raw=b"{not json")
    refused(400, "malformed", "advertise", None, raw=b'{"lease_id": "x", "lease_id": "y"}')
    refused(400, "malformed", "advertise", {"cipher_key": good_key, "mask_key": good_key})
    refused(400, "malformed", "advertise", {"lease_id": lease, "cipher_key": "!!!", "mask_key": good_key})
    refused(400, "malformed", "advertise", {"lease_id": lease, "cipher_key": 5, "mask_key": good_key})
    refused(422, "bad_key", "advertise", {"lease_id": lease, "cipher_key": to_json(bytes(31)), "mask_key": good_key})
    refused(409, "wrong_phase", "masked", {"lease_id": lease, "weight": 1, "masked": to_json(bytes(8))})
    refused(404, "not_found", "secrets", {"lease_id": lease})
    refused(409, "no_lease", "advertise", {"lease_id": "L999-nope", "cipher_key": good_key, "mask_key": good_key})
    resp = h.request(
        "POST", "/v1/secagg/7/advertise", p.name, json={"lease_id": lease, "cipher_key": good_key, "mask_key": good_key}
    )
    assert resp.status_code == 409 and resp.json()["error"] == "round_closed"
    resp = h.request("GET", "/v1/secagg/round", p.name, params={"lease_id": lease, "after": "later"})
    assert resp.status_code == 400
    resp = h.request("GET", "/v1/secagg/round", p.name, params={"lease_id": lease, "wait": 1e9})
    assert resp.status_code == 400
    resp = h.http.get("/v1/secagg/round", params={"lease_id": lease})
    assert resp.status_code == 401
    for q in ps:
        q.advertise()
    peers = [k for k in p.get()["directory"]["cipher_keys"]]
    refused(422, "bad_recipient", "shares", {"lease_id": lease, "ciphertexts": {"99": to_json(bytes(174))}})
    refused(422, "bad_ciphertext", "shares", {"lease_id": lease, "ciphertexts": {peers[0]: to_json(bytes(10))}})
    refused(400, "malformed", "shares", {"lease_id": lease, "ciphertexts": {"one": to_json(bytes(10))}})
    refused(400, "malformed", "shares", {"lease_id": lease, "ciphertexts": [1, 2]})
    for q in ps:
        q.share()
    refused(
        422,
        "weight_out_of_range",
        "masked",
        {"lease_id": lease, "weight": MAX_EXAMPLES + 1, "masked": to_json(bytes(4 * h.length))},
    )
    refused(
        422, "weight_out_of_range", "masked", {"lease_id": lease, "weight": 0, "masked": to_json(bytes(4 * h.length))}
    )
    refused(400, "malformed", "masked", {"lease_id": lease, "weight": 1.5, "masked": to_json(bytes(4 * h.length))})
    refused(422, "bad_length", "masked", {"lease_id": lease, "weight": 3, "masked": to_json(bytes(4 * h.length - 4))})
    for q in ps:
        q.masked()
    refused(422, "bad_shares", "unmask", {"lease_id": lease, "self_mask_shares": {}, "key_shares": {}})
    request = p.get()["unmask_request"]
    bad = {str(c): to_json(bytes(69)) for c in request["survivors"]}
    refused(422, "bad_shares", "unmask", {"lease_id": lease, "self_mask_shares": bad, "key_shares": {}})
    for q in ps:
        q.unmask()
    assert h.status()["secure_aggregation"]["completed_rounds"] == 1
    assert h.status()["rejected"]["malformed"] >= 8


def test_a_resent_message_is_answered_again_and_another_refused(harness):
    h = harness
    ps = parties(h, 5)
    keys = ps[0].secagg.advertise()
    fields = {"cipher_key": keys.cipher_key, "mask_key": keys.mask_key}
    assert ps[0].ok("advertise", fields)["replayed"] is False
    assert ps[0].ok("advertise", fields)["replayed"] is True
    resp = ps[0].post("advertise", {"cipher_key": bytes(32), "mask_key": keys.mask_key})
    assert resp.status_code == 409 and resp.json()["error"] == "already_sent"


def test_plain_uploads_are_refused_on_a_secure_task(harness):
    """A plain update would show the server an individual update: it never folds in."""
    from asyncfl import wire

    h = harness
    lease = h.request("POST", "/v1/checkin", "a", json={"eligible": True}).json()
    m = h.server.model
    body = wire.encode_update(
        lease_id=lease["lease_id"],
        base_version=0,
        idempotency_key="plain-upload-1",
        n_examples=10,
        steps=1,
        loss=0.5,
        delta=torch.zeros(m.numel),
        names=m.names,
        shapes=m.shapes,
    )
    resp = h.request("POST", "/v1/update", "a", content=body)
    assert resp.status_code == 409 and resp.json()["error"] == "secure_aggregation", resp.text
    assert h.server.aggregation.state.version == 0 and h.server.aggregation.aggregator.pending == 0


def test_a_restart_aborts_the_open_round(tmp_path):
    h = Harness(tmp_path)
    try:
        ps = parties(h, 5)
        for step in ("advertise", "share", "masked"):
            for p in ps:
                getattr(p, step)()
        h.close()
        h.open()
        sa = h.status()["secure_aggregation"]
        assert sa["failed_rounds"] == {"restart": 1} and h.status()["round"]["number"] == 2
        assert h.server.aggregation.state.version == 0
        resp = ps[0].post("unmask", {"self_mask_shares": {}, "key_shares": {}})
        assert resp.status_code == 409 and resp.json()["error"] == "lease_cancelled"
        fresh = parties(h, 5, seed=1)  # the next round works
        for step in ("advertise", "share", "masked", "unmask"):
            for p in fresh:
                getattr(p, step)()
        assert h.server.aggregation.state.version == 1
    finally:
        h.close()


def test_the_stored_masked_input_does_not_reveal_the_update(tmp_path):
    """Over several rounds, the masked input the server holds for a client whose update is all
    +r and for one whose update is all -r look alike: about half of their ring elements lie in
    the lower half of the ring. Unmasked, the encodings are at the two extremes (all below,
    all above)."""
    h = Harness(tmp_path, cohort=3, threshold=0.6)
    half = np.uint64(1 << 31)
    try:
        fractions = {"plus": [], "minus": []}
        plain = {}
        for trial in range(4):
            rng = np.random.default_rng(trial)
            ps = [Party(h, name, np.full(h.length, s * CLIP), 10) for name, s in zip("abc", (1, -1, 1))]
            for step in ("advertise", "share", "masked"):
                for p in ps:
                    getattr(p, step)()
            stored = h.server.secure_rounds.current.received[2]
            ring = Ring(32)
            for label, p in (("plus", ps[0]), ("minus", ps[1])):
                masked = ring.from_bytes(stored[p.view["client"]].masked, h.length)
                fractions[label].append(float(np.mean(masked < half)))
                plain[label] = float(np.mean(p.codec.encode(p.update, rng) < half))
            for p in ps:
                p.unmask()
        plus, minus = np.mean(fractions["plus"]), np.mean(fractions["minus"])
        sigma = 0.5 / np.sqrt(4 * h.length)
        assert abs(plus - 0.5) < 5 * sigma and abs(minus - 0.5) < 5 * sigma and abs(plus - minus) < 6 * sigma
        assert plain == {"plus": 1.0, "minus": 0.0}  # the same statistic separates the plain encodings
    finally:
        h.close()


def test_config_the_server_cannot_run_securely_is_refused(tmp_path):
    cfg = experiment("secagg", 4, 0.5)
    tree = json.loads(cfg.model_dump_json())
    tree["runs"][0]["algorithm"]["partial_weight"] = "work_fraction"
    with pytest.raises(config.ConfigError, match="work_fraction"):
        FLServer(config.validate(tree), ServerConfig(), tmp_path / "s")


@pytest.mark.parametrize("algorithm", ["fedavg", "scaffold"])
def test_client_runtimes_take_part_unchanged(tmp_path, algorithm):
    """Three ClientRuntime objects (the code `asyncfl client` runs), in threads against the
    in-process server, train two secure rounds: every trip ends accepted and the model steps
    twice, with no plain upload; SCAFFOLD's clients keep their advanced c_i on disk."""
    import threading

    from asyncfl.client.http import ServerApi
    from asyncfl.client.runtime import ClientRuntime

    h = Harness(tmp_path, cohort=3, threshold=0.6, max_examples=400, algorithm={"name": algorithm})  # partitions: 180
    try:
        runtimes = [
            ClientRuntime(
                ServerApi("http://testserver", h.tokens[name], transport=h.http._transport),
                f"digits:client={i}",
                ack_log=tmp_path / f"{name}.acks",
                max_trips=2,
            )
            for i, name in enumerate("abc")
        ]
        threads = [threading.Thread(target=rt.run) for rt in runtimes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert [rt.stats["accepted"] for rt in runtimes] == [2, 2, 2], [rt.stats for rt in runtimes]
        assert h.server.aggregation.state.version == 2
        status = h.status()
        assert status["secure_aggregation"]["completed_rounds"] == 2
        assert status["compression"]["bytes"]["uploads_decoded"] == 0
        if algorithm == "scaffold":
            states = [torch.load(rt.state_path, weights_only=True)["state"]["control"] for rt in runtimes]
            assert all(float(c.abs().max()) > 0 for c in states)
    finally:
        h.close()
