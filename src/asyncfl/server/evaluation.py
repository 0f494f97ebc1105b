"""Periodic evaluation of the current model on the test split: the accuracy history, the target
flag (both durable), and the latest model written next to the state for `asyncfl` tools."""

from __future__ import annotations

import logging
import math
import time

from asyncfl import wire
from asyncfl.models.flat import FlatModel
from asyncfl.server.shared import Shared
from asyncfl.server.store import Store, atomic_write

log = logging.getLogger("asyncfl.server")


class Evaluation:
    def __init__(self, shared: Shared, model: FlatModel, data, target_accuracy: float, every_s: float):
        self.shared, self.model, self.data = shared, model, data
        self.target_accuracy, self.every_s = target_accuracy, every_s
        self.evals: list[dict] = []
        self.reached_target = False
        self._tried_at = -math.inf  # the last attempt: a failing one is not retried before every_s
        self._non_finite: int | None = None  # the version found to evaluate to NaN/Inf (not retried)
        self._snapshot_version: int | None = None  # the version model.afl holds

    def restore(self) -> None:
        store = self.shared.store
        self.reached_target = bool(store.get_meta("reached_target", False))
        self.evals = [
            dict(zip(("id", "t", "version", "accuracy", "loss"), r))
            for r in store.query("SELECT id, t, version, accuracy, loss FROM evals ORDER BY id")
        ]
        self._tried_at = self.evals[-1]["t"] if self.evals else -math.inf
        self._non_finite = self._snapshot_version = None

    def history(self, since: int = 0) -> list[dict]:
        with self.shared.lock:
            return [e for e in self.evals if e["id"] > since]

    def maybe_evaluate(self) -> None:
        """Every `every_s` seconds, and at least every 30 s while the model is unchanged. A
        version whose loss or accuracy is not finite is warned about once and left out of the
        history (JSON has no NaN); a version's weights never change, so it is not retried."""
        sh = self.shared
        now = time.time()
        with sh.lock:
            version, w = sh.aggregation.state.version, sh.aggregation.state.w
            last = self.evals[-1] if self.evals else None
        if version == self._non_finite or now - self._tried_at < self.every_s:
            return
        if last is not None and last["version"] == version and now - last["t"] < 30:
            return
        if version != self._snapshot_version:  # before the row is published: history never runs ahead of it
            atomic_write(sh.store.dir / "model.afl", wire.encode_model(version, w, self.model.names, self.model.shapes))
            self._snapshot_version = version
        self._tried_at = time.time()  # after the snapshot's write: attempts, not writes, are every_s apart
        acc, loss = self.model.evaluate(w, self.data.x_test, self.data.y_test)
        if math.isfinite(acc) and math.isfinite(loss):
            self._record(now, version, acc, loss)
        else:
            self._non_finite = version
            log.warning(
                "model version %d evaluates to accuracy %s, loss %s: not recorded; evaluation resumes with the "
                "next version",
                version,
                acc,
                loss,
            )

    def _record(self, now: float, version: int, acc: float, loss: float) -> None:
        sh = self.shared
        with sh.store.transaction() as db:
            cur = db.execute(
                "INSERT INTO evals(t, version, accuracy, loss) VALUES(?, ?, ?, ?)", (now, version, acc, loss)
            )
            row = {"id": cur.lastrowid, "t": now, "version": version, "accuracy": acc, "loss": loss}
            if acc >= self.target_accuracy and not self.reached_target:
                Store.put_meta(db, "reached_target", True)
                Store.put_meta(db, "target_reached_at", {"t": now, "version": version})
        with sh.lock:
            self.evals.append(row)
            if acc >= self.target_accuracy:
                self.reached_target = True
