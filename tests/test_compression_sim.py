"""Compression wired into the simulator: real payload bytes, transfer times, error feedback."""

import json
import math

import pytest
import torch

from asyncfl import config
from asyncfl.cli import main
from asyncfl.compression import Codec, ErrorFeedback, parse_codec
from asyncfl.experiment import build_simulation

UP_BW = 200.0  # bytes/s: a dense update (9.6 KB) takes 48 s, an int4 one 6 s


def fast_config(small, upload=None, download="none", ef=False, extra=()):
    """Constant speeds and bandwidths, negligible compute: a trip lasts exactly its transfers.
    Two clients in flight keep the number of trips (and the test's run time) small."""
    sets = [
        "executor=batched",
        "stop.max_time=100",
        "runs.fedbuff.scheduler.concurrency=2",
        "runs.fedbuff.algorithm.buffer_size=2",
        "population.compute_per_example={kind: constant, scale: 1.0e-9}",
        "population.download_bandwidth={kind: constant, scale: 1.0e+5}",
        f"population.upload_bandwidth={{kind: constant, scale: {UP_BW}}}",
        *extra,
    ]
    if upload is not None:
        sets.append(
            f"runs.fedbuff.compression={{upload: '{upload}', download: '{download}', error_feedback: {str(ef).lower()}}}"
        )
    return small(sets=sets)


class Spy(Codec):
    """Delegates to a real codec and records the length of every payload it produces."""

    def __init__(self, inner: Codec):
        self.inner, self.lengths = inner, []
        self.codec_id = inner.codec_id

    spec = property(lambda self: self.inner.spec)
    stochastic = property(lambda self: self.inner.stochastic)
    lossless = property(lambda self: self.inner.lossless)

    def encode(self, x, generator=None):
        payload = self.inner.encode(x, generator)
        self.lengths.append(len(payload))
        return payload

    def decode(self, payload, expected_numel=None):
        return self.inner.decode(payload, expected_numel)

    def bytes_for(self, numel):
        return self.inner.bytes_for(numel)

    def error_bound(self, x):
        return self.inner.error_bound(x)

    def _encode_body(self, x, gen):
        return self.inner._encode_body(x, gen)

    def _signature(self, numel):
        return self.inner._signature(numel)


@pytest.mark.parametrize("spec,ef", [("int8", False), ("topk:0.1+int4", True)])
def test_counted_bytes_are_the_encoded_payloads(small, spec, ef):
    cfg = fast_config(small, spec, download="fp16", ef=ef, extra=["stop.max_time=60"])
    sim = build_simulation(cfg, cfg.run("fedbuff"))
    spy = Spy(sim.upload_codec)
    sim.upload_codec = spy
    if ef:
        sim.error_feedback = ErrorFeedback(spy)
    m = sim.run()
    numel = sim.state.w.numel()
    assert len(spy.lengths) == m.completed > 5
    assert m.bytes_up == sum(spy.lengths) == m.completed * parse_codec(spec).bytes_for(numel)
    assert m.bytes_down == m.started * parse_codec("fp16").bytes_for(numel)
    assert parse_codec(spec).bytes_for(numel) < 4 * numel / 3
    s = m.summary(0.8)
    assert s["codec"] == parse_codec(spec).spec and s["codec_download"] == "fp16" and s["error_feedback"] is ef
    assert s["upload_payload_bytes"] == spy.lengths[0]


@pytest.mark.parametrize("spec", ["none", "fp16", "int4", "topk:0.05+int8"])
def test_transfer_time_uses_the_encoded_size(small, spec):
    """Async, concurrency 2, every trip = download + upload of exact sizes: each slot completes
    floor(T / duration) trips, so the count pins the trip duration to the payload bytes."""
    cfg = fast_config(small, spec)
    sim = build_simulation(cfg, cfg.run("fedbuff"))
    m = sim.run()
    numel = sim.state.w.numel()
    down, up = parse_codec("none").bytes_for(numel), parse_codec(spec).bytes_for(numel)
    duration = down / 1e5 + up / UP_BW + 1e-6  # compute: 5 steps x <= 16 examples x 1e-9 s
    assert m.completed == 2 * math.floor(100 / duration)
    assert m.bytes_up == m.completed * up and m.bytes_down == m.started * down


class LoggingEF(ErrorFeedback):
    def __init__(self, codec):
        super().__init__(codec)
        self.log = []  # (device, true update, residual before, decoded)

    def encode(self, device_id, update, generator=None):
        before = self.residual(device_id)
        payload, decoded = super().encode(device_id, update, generator)
        self.log.append((device_id, update.clone(), before, decoded))
        return payload, decoded


def test_error_feedback_residual_is_carried_across_trips_of_a_device(small):
    cfg = fast_config(small, "topk:0.05", ef=True, extra=["stop.max_time=60", "population.devices=6"])
    sim = build_simulation(cfg, cfg.run("fedbuff"))
    sim.error_feedback = ef = LoggingEF(sim.upload_codec)
    sim.run()
    by_device = {}
    for device, update, before, decoded in ef.log:
        by_device.setdefault(device, []).append((update, before, decoded))
    repeat = {d: trips for d, trips in by_device.items() if len(trips) >= 3}
    assert len(repeat) >= 3
    for d, trips in repeat.items():
        assert trips[0][1] is None  # first trip: no residual yet
        for (u0, b0, dec0), (_, b1, _) in zip(trips, trips[1:]):
            # the residual a trip starts with is what the previous trip of this device left
            expected = u0 + (b0 if b0 is not None else 0) - dec0
            assert torch.allclose(b1, expected, atol=1e-6)
        # nothing is lost: what the server decoded plus what is still held = the true updates
        sent = sum(dec for _, _, dec in trips)
        true = sum(u for u, _, _ in trips)
        assert torch.allclose(sent + ef.residual(d), true, atol=1e-5)
        assert ef.residual(d).abs().sum() > 0


def test_compressed_runs_are_deterministic(small, tmp_path):
    from asyncfl.experiment import run_experiment

    outs = []
    for i in range(2):
        cfg = fast_config(small, "topk:0.1+int8", ef=True, extra=["stop.max_time=30", "population.devices=6"])
        run_experiment(cfg, tmp_path / str(i), runs=["fedbuff"])
        s = json.loads((tmp_path / str(i) / "summary.json").read_text())
        for r in s["runs"]:
            r.pop("wall_seconds"), r.pop("peak_rss_mb")  # measured, not computed
        s.pop("peak_rss_mb")
        outs.append(s)
    assert outs[0] == outs[1]


def test_compression_config_errors(small):
    with pytest.raises(config.ConfigError, match=r"runs\.1\.compression\.upload: .*int3"):
        small(sets=["runs.fedbuff.compression={upload: int3}"])
    with pytest.raises(config.ConfigError, match=r"runs\.1\.compression\.download: .*top-k"):
        small(sets=["runs.fedbuff.compression={download: 'topk:0.1'}"])
    with pytest.raises(config.ConfigError, match=r"runs\.1\.compression\.codec: Extra inputs"):
        small(sets=["runs.fedbuff.compression={codec: int8}"])


def test_compression_preset_quick(tmp_path, capsys):
    """`asyncfl compare --preset compression --quick`: every codec runs; fewer bytes per update
    with fewer bits; the quick: block shrank the experiment."""
    assert "quick" not in config.load(preset="compression").model_dump()
    rc = main(["compare", "--preset", "compression", "--quick", "--out", str(tmp_path)])
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert list(runs) == ["none", "fp16", "int8", "int4", "topk10_ef", "topk10_int8_ef"]
    per_update = [runs[n]["upload_payload_bytes"] for n in ("none", "fp16", "int8", "int4", "topk10_int8_ef")]
    assert per_update == sorted(per_update, reverse=True) and per_update[0] > 6 * per_update[-1]
    for r in runs.values():
        assert r["bytes_up"] == r["trips"]["completed"] * r["upload_payload_bytes"]
        assert r["final_accuracy"] > 0.5, r["name"]
    assert runs["topk10_ef"]["error_feedback"] is True and runs["int8"]["error_feedback"] is False
    resolved = (tmp_path / "config.yaml").read_text()
    assert "devices: 50" in resolved and "quick" not in resolved
    assert "codec" in capsys.readouterr().out  # the table gains a codec column


def test_quick_without_a_quick_block_is_an_error(tmp_path, capsys):
    assert main(["compare", "--preset", "quickstart", "--quick", "--out", str(tmp_path)]) == 2
    assert "no quick: block" in capsys.readouterr().out
