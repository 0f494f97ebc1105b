"""The server's periodic evaluation: a model that evaluates to NaN is warned about once, never
fails the background ticker or grows the log per tick, and evaluation resumes with the next
version; an evaluation that fails is retried at the evaluation cadence, not on every tick."""

from __future__ import annotations

import json
import logging
import math
import time

import torch
from test_server_inputs import Harness

from asyncfl import wire


def set_model(server, version: int, value: float) -> None:
    """As if the server had stepped to `version` with every weight equal to `value`."""
    agg = server.aggregation
    with server.lock:
        agg.state.w = torch.full_like(agg.state.w, value)
        agg.state.version = version
        agg.models[version] = agg.state.w


def snapshot_of(server) -> tuple[int, int]:
    """(version, inode) of model.afl: a rewrite replaces the file, so its inode changes."""
    path = server.store.dir / "model.afl"
    return wire.decode(path.read_bytes(), wire.ModelHeader).header.version, path.stat().st_ino


def test_a_non_finite_model_is_warned_about_once_and_evaluation_goes_on(tmp_path, caplog):
    with Harness(tmp_path, eval_every_s=0.01) as h:
        server = h.server
        server.tick()
        assert [e["version"] for e in server.evaluation.evals] == [0] and snapshot_of(server)[0] == 0
        set_model(server, 1, math.nan)
        caplog.set_level(logging.INFO, logger="asyncfl.server")
        for _ in range(20):  # each tick is past eval_every_s
            time.sleep(0.012)
            server.tick()
        logged = [r for r in caplog.records if r.name == "asyncfl.server"]
        assert len(logged) == 1 and logged[0].levelno == logging.WARNING
        assert "model version 1 evaluates to accuracy" in logged[0].getMessage()
        assert [e["version"] for e in server.evaluation.evals] == [0]  # no NaN in the history (JSON has none)
        json.dumps(server.evaluation.evals, allow_nan=False)
        written = snapshot_of(server)
        assert written[0] == 1  # model.afl holds the current model, written once
        set_model(server, 2, math.inf)
        time.sleep(0.012)
        server.tick()
        assert len([r for r in caplog.records if r.name == "asyncfl.server"]) == 2

        server.start_background(period=0.005)  # the ticker keeps running and evaluates the next version
        time.sleep(0.1)
        assert len([r for r in caplog.records if r.name == "asyncfl.server"]) == 2
        set_model(server, 3, 0.0)
        deadline = time.monotonic() + 10
        while [e["version"] for e in server.evaluation.evals][-1] != 3:
            assert time.monotonic() < deadline, "the ticker stopped evaluating"
            time.sleep(0.01)
        assert server._ticker.is_alive()
        assert [e["version"] for e in server.evaluation.evals] == [0, 3]
        assert snapshot_of(server)[0] == 3
        again = snapshot_of(server)
        time.sleep(0.05)
        assert snapshot_of(server) == again  # not rewritten while the version stays
    assert not [r for r in caplog.records if r.name == "asyncfl.server" and r.levelno >= logging.ERROR]


def test_a_failing_evaluation_is_retried_after_eval_every_s_not_every_tick(tmp_path):
    with Harness(tmp_path, eval_every_s=0.2) as h:
        server = h.server
        calls = []

        def broken(*args):
            calls.append(time.monotonic())
            raise OSError("test split unreadable")

        server.model.evaluate = broken
        failed = ticks = 0
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            try:
                server.tick()
            except OSError:
                failed += 1
            ticks += 1
            time.sleep(0.01)
        gaps = [b - a for a, b in zip(calls, calls[1:])]
        assert failed == len(calls) >= 2 and ticks >= 5 * len(calls)  # most ticks did not retry
        assert min(gaps) >= 0.2 and len(calls) <= 3
