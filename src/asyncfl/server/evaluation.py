"""Periodic evaluation of the current model on the test split: the accuracy history, the target
flag (both durable), and the latest model written next to the state for `asyncfl` tools."""

from __future__ import annotations

import time

from asyncfl import wire
from asyncfl.models.flat import FlatModel
from asyncfl.server.shared import Shared
from asyncfl.server.store import Store, atomic_write


class Evaluation:
    def __init__(self, shared: Shared, model: FlatModel, data, target_accuracy: float, every_s: float):
        self.shared, self.model, self.data = shared, model, data
        self.target_accuracy, self.every_s = target_accuracy, every_s
        self.evals: list[dict] = []
        self.reached_target = False

    def restore(self) -> None:
        store = self.shared.store
        self.reached_target = bool(store.get_meta("reached_target", False))
        self.evals = [
            dict(zip(("id", "t", "version", "accuracy", "loss"), r))
            for r in store.query("SELECT id, t, version, accuracy, loss FROM evals ORDER BY id")
        ]

    def history(self, since: int = 0) -> list[dict]:
        with self.shared.lock:
            return [e for e in self.evals if e["id"] > since]

    def maybe_evaluate(self) -> None:
        """Every `every_s` seconds, and at least every 30 s while the model is unchanged."""
        sh = self.shared
        now = time.time()
        last = self.evals[-1] if self.evals else None
        with sh.lock:
            version, w = sh.aggregation.state.version, sh.aggregation.state.w
        if last is not None and (
            now - last["t"] < self.every_s or (last["version"] == version and now - last["t"] < 30)
        ):
            return
        acc, loss = self.model.evaluate(w, self.data.x_test, self.data.y_test)
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
        if version != (last or {}).get("version"):
            atomic_write(sh.store.dir / "model.afl", wire.encode_model(version, w, self.model.names, self.model.shapes))
