"""One process hosting the three roles (selector, coordinator, aggregator) over one store.

The roles talk through plain method calls under one state lock. Durability is a group commit:
an event changes memory under the lock and notes the *epoch* its change belongs to; `_sync`
then snapshots every role's changes (as bytes, under the lock), writes them in one store
transaction outside the lock, and only then lets the request answer. Uploads that arrive while
a commit is on disk share the next one, so fsyncs are paid per group, not per update, and an
answer still never runs ahead of the disk. Splitting the roles across processes later means
replacing the method calls with RPCs; none of them touches HTTP, which lives in app.py.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import threading
import time
import zlib
from pathlib import Path

import torch

from asyncfl.algorithms.aggregators import Verdict
from asyncfl.algorithms.private import PrivateAggregator
from asyncfl.algorithms.shuffle import mix
from asyncfl.algorithms.update import ClientUpdate
from asyncfl.compression import parse_codec
from asyncfl.config import ConfigError, ExperimentConfig
from asyncfl.build import build_aggregator, build_data, build_flat_model, client_options, num_users
from asyncfl.scheduling import build_policy
from asyncfl.server import observability, wire
from asyncfl.server.aggregation import AggregationRole, Fold
from asyncfl.server.auth import Authenticator, RateLimiter
from asyncfl.server.coordinator import Coordinator
from asyncfl.server.errors import ApiError
from asyncfl.server.selector import Selector
from asyncfl.server.settings import ServerConfig
from asyncfl.server.store import Store, atomic_write

log = logging.getLogger("asyncfl.server")
PROTOCOL = 1
# bytes over the wire: update bodies read (any outcome), codec payloads of the updates that passed
# validation (what the upload codec produced; frame header excluded), model frames served
TRAFFIC = {"upload_body_bytes": 0, "upload_payload_bytes": 0, "uploads_decoded": 0, "download_bytes": 0,
           "downloads": 0}


def fingerprint(cfg: ExperimentConfig, run: str, task: str) -> str:
    """What must not change under a state dir: data, model, algorithm, schedule, seed."""
    tree = cfg.model_dump(mode="json")
    tree = {k: tree[k] for k in ("seed", "data", "model", "trainer")} | {"run": cfg.run(run).model_dump(mode="json"),
                                                                         "task": task}
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


class FLServer:
    def __init__(self, cfg: ExperimentConfig, settings: ServerConfig, state_dir: str | Path, run: str | None = None):
        self.cfg, self.settings = cfg, settings
        self.spec = cfg.run(run)
        self.task = settings.task or self.spec.name
        privacy = self.spec.privacy
        if privacy is not None and privacy.noise_multiplier > 0 and privacy.sample_rate is None:
            raise ConfigError(
                f"run {self.spec.name!r}: privacy.sample_rate is required by `asyncfl serve`: the server cannot know how "
                "many users will take part, so it cannot derive the rate epsilon is accounted at; set it to the "
                "expected share of all users contributing to one server step (e.g. buffer_size / users)")
        self.data = build_data(cfg)
        self.model = build_flat_model(cfg, self.data)
        comp = self.spec.compression
        self.upload_codec = parse_codec(comp.upload) if comp is not None else None
        download = parse_codec(comp.download) if comp is not None else None
        self.download_codec = download if download is not None and not download.lossless else None
        self.store = Store(state_dir)
        self.lock = threading.RLock()
        aggregator = build_aggregator(self.spec, cfg.trainer.lr, num_users=num_users(cfg, self.data), seed=cfg.seed)
        self.aggregation = AggregationRole(aggregator, self.model.initial_weights(), self.model.names,
                                           self.model.shapes, settings.max_update_norm, settings.keep_versions,
                                           self.upload_codec, comp.upload if comp is not None else None)
        self.private = aggregator if isinstance(aggregator, PrivateAggregator) else None
        self._epsilon: tuple[int, float | None] | None = None  # (noisy steps, epsilon) cache
        self.traffic = dict(TRAFFIC)
        self.policy = build_policy(self.spec.scheduler)
        self.coordinator = Coordinator(self.policy, self.aggregation, settings.lease_timeout, cfg.seed)
        self.selector = Selector(self.coordinator, settings.retry_after, lambda: self.done)
        self.auth = Authenticator(self.store, self.task)
        self.limiter = RateLimiter(settings.rate_per_s, settings.rate_burst)
        self.rejected: collections.Counter[str] = collections.Counter()
        self.latency: collections.deque[float] = collections.deque(maxlen=2000)
        self.evals: list[dict] = []
        self.reached_target = False
        self.started = time.time()
        self._frames: dict[int, bytes] = {}
        self._stop = threading.Event()
        self._obsolete_files: list[str] = []
        self._commit_lock = threading.Lock()
        self._epoch = 1  # changes made now are durable once epoch `_epoch` is committed
        self._durable = 0
        self.durable_version = 0  # what /status shows: a step is public once it survives a crash
        self._lost = 0  # epochs up to this one were rolled back by a failed commit
        self._rows: list[tuple] = []
        self._next_seq = 1
        self._inflight: dict[tuple[str, str], tuple[int, dict, int]] = {}
        self._initial: str | None = None
        self._ticker: threading.Thread | None = None
        self._open(fingerprint(cfg, self.spec.name, self.task))

    # ---- start-up and durability ------------------------------------------------------
    def _open(self, fp: str) -> None:
        saved = self.store.get_meta("fingerprint")
        if saved is None:
            self.policy.start(self.coordinator)
            self._initial = fp
            self._sync(self._epoch)
        elif saved != fp:
            raise ConfigError(f"state dir {self.store.dir} holds a run with another configuration "
                              f"(fingerprint {saved}, this one {fp}); use a fresh --state-dir")
        else:
            self._restore()

    def _restore(self) -> None:
        self.aggregation.restore(self.store)
        self.coordinator.restore(self.store)
        self.rejected = collections.Counter(self.store.get_meta("rejected", {}))
        self.traffic = TRAFFIC | self.store.get_meta("traffic", {})
        self.reached_target = bool(self.store.get_meta("reached_target", False))
        self.evals = [dict(zip(("id", "t", "version", "accuracy", "loss"), r)) for r in
                      self.store.query("SELECT id, t, version, accuracy, loss FROM evals ORDER BY id")]
        self._next_seq = (self.store.query("SELECT max(seq) FROM updates")[0][0] or 0) + 1
        self._frames.clear()
        self._rows, self._inflight = [], {}
        self.durable_version = self.aggregation.state.version

    def _sync(self, epoch: int) -> None:
        """Return once the changes of `epoch` are durable (committing them, and whatever else
        is pending, if no one has yet); 503 if a failed commit rolled them back."""
        with self._commit_lock:
            if self._durable >= epoch:
                return
            if epoch <= self._lost:
                raise self._storage_error()
            with self.lock:
                self.aggregation.prune(self.coordinator.needed_versions())
                rows, self._rows = self._rows, []
                agg, coord = self.aggregation.snapshot(), self.coordinator.snapshot()
                version = self.aggregation.state.version
                rejected, initial, traffic = dict(self.rejected), self._initial, dict(self.traffic)
                target, self._epoch = self._epoch, self._epoch + 1
            new_files: list[str] = []
            try:
                with self.store.transaction() as db:
                    db.executemany("INSERT INTO updates(seq, client, idem_key, lease_id, base_version, "
                                   "version_at_submit, staleness, n_examples, steps, loss, norm, verdict, received_at, "
                                   "status, response) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                    obsolete = AggregationRole.persist(agg, db, self.store, new_files)
                    Coordinator.persist(coord, db)
                    Store.put_meta(db, "rejected", rejected)
                    Store.put_meta(db, "traffic", traffic)
                    if initial is not None:
                        Store.put_meta(db, "fingerprint", initial)
            except Exception:
                log.exception("commit failed; rolling back to the last durable state")
                self.store.remove_files(new_files)
                with self.lock:
                    self._restore()
                    self._lost, self._epoch = self._epoch, self._epoch + 1
                raise self._storage_error() from None
            self._durable = target
            with self.lock:
                self.durable_version = max(self.durable_version, version)
                self._initial = None
                self._obsolete_files += obsolete

    @staticmethod
    def _storage_error() -> ApiError:
        return ApiError(503, "storage_error", "the server could not make the change durable; retry later",
                        {"Retry-After": "1"})

    # ---- requests ---------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> str:
        try:
            client = self.auth.client_of(authorization)
            self.limiter.check(client)
            return client
        except ApiError as err:
            self.rejected[err.code] += 1
            raise

    def reject(self, err: ApiError) -> None:
        self.rejected[err.code] += 1

    @property
    def done(self) -> bool:
        stop = self.cfg.stop
        if stop.at_target and self.reached_target:
            return True
        return stop.max_trips is not None and self.coordinator.issued >= stop.max_trips

    def checkin(self, client: str, eligible: bool = True) -> dict:
        """A new lease is durable before the client hears of it (leases survive restarts)."""
        with self.lock:
            issued = self.coordinator.issued
            answer, _ = self.selector.checkin(client, eligible)
            epoch = self._epoch if self.coordinator.issued != issued else None
        if epoch is not None:
            self._sync(epoch)
        return answer

    def task_info(self) -> dict:
        """What a client needs to build the same model and trainer as the simulator."""
        return {
            "protocol": PROTOCOL,
            "task": self.task,
            "run": self.spec.name,
            "config": self.cfg.model_copy(update={"runs": [self.spec]}).model_dump(mode="json"),
            "num_features": self.data.num_features,
            "num_classes": self.data.num_classes,
            "prox_mu": client_options(self.spec).prox_mu,
            "tensors": [{"name": n, "shape": list(s)} for n, s in zip(self.model.names, self.model.shapes)],
            "codecs": [self.aggregation.expected_codec or "none"],
            "download_codec": self.download_codec.spec if self.download_codec is not None else "none",
            "max_body_bytes": self.settings.max_body_bytes,
        }

    def model_frame(self, version: int) -> bytes:
        """A version's frame, built once: raw float32, or with a lossy download codec its
        payload, stochastic rounding seeded from (experiment seed, version) as in the simulator."""
        with self.lock:
            frame = self._frames.get(version)
            if frame is None:
                if version not in self.aggregation.models:
                    raise ApiError(404, "version_unavailable", f"model version {version} is not available; "
                                   f"current version is {self.aggregation.state.version}")
                w = self.aggregation.models[version]
        if frame is None:
            gen = None
            if self.download_codec is not None:
                gen = torch.Generator().manual_seed(int(mix(self.cfg.seed, version, 0xD0)[0]) & (2**63 - 1))
            frame = wire.encode_model(version, w, self.model.names, self.model.shapes, self.download_codec, gen)
            with self.lock:
                if len(self._frames) > 4:
                    self._frames.pop(min(self._frames))
                self._frames[version] = frame
        with self.lock:
            self.traffic["download_bytes"] += len(frame)
            self.traffic["downloads"] += 1
        return frame

    def count_upload_body(self, n: int) -> None:
        with self.lock:
            self.traffic["upload_body_bytes"] += n

    def upload(self, client: str, body: bytes) -> tuple[int, dict]:
        """Validate, fold, persist, answer; (status, body). Raises ApiError for bad input."""
        t0 = time.perf_counter()
        self.count_upload_body(len(body))
        try:
            checked = self.aggregation.check(body)  # no lock: pure, the expensive part
            h = checked.header
            key = (client, h.idempotency_key)
            with self.lock:
                pending = self._inflight.get(key)
            if pending is None:
                replay = self.store.query("SELECT status, response FROM updates WHERE client=? AND idem_key=?", key)
                if replay:
                    return replay[0][0], json.loads(replay[0][1]) | {"replayed": True}
                with self.lock:
                    pending = self._inflight.get(key)
                    if pending is None:
                        status, answer, epoch = self._fold(client, h, checked)
            if pending is not None:  # a re-send: the first answer, once it is durable
                status, answer, epoch = pending
                self._sync(epoch)
                return status, answer | {"replayed": True}
            self._sync(epoch)
            self.latency.append(time.perf_counter() - t0)
            return status, answer
        except ApiError as err:
            self.reject(err)
            raise

    def _fold(self, client: str, h, checked) -> tuple[int, dict, int]:
        """Under the state lock: the lease rule, then the policy folds the update in."""
        lease = self.coordinator.active_lease(h.lease_id, client, self.store)
        if h.base_version != lease.base_version:
            raise ApiError(409, "base_mismatch", f"base_version {h.base_version} does not match lease "
                           f"{lease.lease_id}'s version {lease.base_version}")
        update = ClientUpdate(client_id=zlib.crc32(client.encode()), base_version=h.base_version,
                              delta=checked.delta, n_examples=h.n_examples, steps=h.steps,
                              loss=math.nan if h.loss is None else h.loss,
                              start_loss=math.nan if h.start_loss is None else h.start_loss,
                              planned_steps=h.planned_steps)
        version_before = self.aggregation.state.version
        fold = Fold(seq=self._next_seq, staleness=version_before - h.base_version)
        self.aggregation.current = fold
        try:
            self.coordinator.report(lease, update)
        finally:
            self.aggregation.current = None
        verdict = fold.verdict
        version = self.aggregation.state.version
        if verdict == Verdict.DISCARDED:
            status, answer = 409, {"error": "stale", "seq": fold.seq, "version": version,
                                   "detail": f"staleness {fold.staleness} exceeds max_staleness "
                                             f"{self.aggregation.aggregator.max_staleness}; update discarded"}
            self.rejected["stale"] += 1
        elif verdict is None:  # the policy did not submit it
            status, answer = 409, {"error": "lease_cancelled", "seq": fold.seq, "version": version,
                                   "detail": "the round closed before this update could count"}
        else:
            status, answer = 200, {"status": "accepted", "verdict": verdict.value, "seq": fold.seq,
                                   "staleness": fold.staleness, "version": version}
        loss = h.loss
        self._rows.append((fold.seq, client, h.idempotency_key, h.lease_id, h.base_version, version_before,
                           fold.staleness, h.n_examples, h.steps, loss, checked.norm,
                           verdict.value if verdict else "none", time.time(), status, json.dumps(answer)))
        self._next_seq += 1
        self.traffic["upload_payload_bytes"] += checked.payload_bytes
        self.traffic["uploads_decoded"] += 1
        self._inflight[(client, h.idempotency_key)] = (status, answer, self._epoch)
        if len(self._inflight) > 10_000:  # recent answers; older ones are found in the update log
            self._inflight.pop(next(iter(self._inflight)))
        return status, answer, self._epoch

    # ---- background: timers, leases, evaluation ---------------------------------------
    def tick(self) -> None:
        with self.lock:
            epoch = self._epoch if self.coordinator.tick() else None
            obsolete, self._obsolete_files = self._obsolete_files, []
        if epoch is not None:
            self._sync(epoch)
        self.store.remove_files(obsolete)
        self._maybe_evaluate()

    def _maybe_evaluate(self) -> None:
        now = time.time()
        last = self.evals[-1] if self.evals else None
        with self.lock:
            version, w = self.aggregation.state.version, self.aggregation.state.w
        if last is not None and (now - last["t"] < self.settings.eval_every_s
                                 or (last["version"] == version and now - last["t"] < 30)):
            return
        acc, loss = self.model.evaluate(w, self.data.x_test, self.data.y_test)
        with self.store.transaction() as db:
            cur = db.execute("INSERT INTO evals(t, version, accuracy, loss) VALUES(?, ?, ?, ?)", (now, version, acc, loss))
            row = {"id": cur.lastrowid, "t": now, "version": version, "accuracy": acc, "loss": loss}
            if acc >= self.cfg.target_accuracy and not self.reached_target:
                Store.put_meta(db, "reached_target", True)
                Store.put_meta(db, "target_reached_at", {"t": now, "version": version})
        with self.lock:
            self.evals.append(row)
            if acc >= self.cfg.target_accuracy:
                self.reached_target = True
        if version != (last or {}).get("version"):
            atomic_write(self.store.dir / "model.afl", wire.encode_model(version, w, self.model.names, self.model.shapes))

    def start_background(self, period: float = 0.1) -> None:
        def loop():
            while not self._stop.wait(period):
                try:
                    self.tick()
                except Exception:  # keep serving; the failure is logged
                    log.exception("background tick failed")

        self._ticker = threading.Thread(target=loop, name="asyncfl-ticker", daemon=True)
        self._ticker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        try:
            self._sync(self._epoch)  # the rejection counters
        except ApiError:
            pass
        self.store.close()

    # ---- observability ----------------------------------------------------------------
    def status(self) -> dict:
        with self.lock:
            agg, co = self.aggregation, self.coordinator
            buffer_size = getattr(agg.aggregator, "buffer_size", None)
            answer = {
                "task": self.task, "run": self.spec.name, "algorithm": self.spec.algorithm.name,
                "mode": self.policy.mode, "version": self.durable_version,
                "buffer": {"fill": agg.aggregator.pending, "size": buffer_size},
                "concurrency": self.spec.scheduler.concurrency,
                "leases": {"active": len(co.leases), "open_slots": co.open_slots, "issued": co.issued,
                           "ended": dict(co.ended)},
                "updates": dict(agg.counts),
                "rejected": dict(self.rejected) | ({"rate_limited": self.limiter.limited} if self.limiter.limited else {}),
                "last_eval": self.evals[-1] if self.evals else None,
                "target_accuracy": self.cfg.target_accuracy,
                "reached_target": self.reached_target, "done": self.done,
                "uptime_s": round(time.time() - self.started, 3),
            }
            answer["compression"] = self._compression_status()
            answer["privacy"] = self._privacy_status()
            if self.policy.mode == "sync":
                answer["round"] = {"number": self.policy.round, "open": self.policy.open, "arrived": self.policy.arrived}
            return answer

    def _compression_status(self) -> dict:
        t = self.traffic
        return {"upload_codec": self.aggregation.expected_codec or "none",
                "download_codec": self.download_codec.spec if self.download_codec is not None else "none",
                "error_feedback": bool(self.spec.compression and self.spec.compression.error_feedback),
                "bytes": dict(t),
                "upload_payload_bytes_per_update": (t["upload_payload_bytes"] / t["uploads_decoded"]
                                                    if t["uploads_decoded"] else None)}

    def _privacy_status(self) -> dict | None:
        """The DP aggregator's report; epsilon is recomputed only when a noisy step was taken."""
        if self.private is None:
            return None
        p = self.private
        steps = p.noisy_steps
        if self._epsilon is None or self._epsilon[0] != steps:
            self._epsilon = (steps, p.epsilon())
        # the fields of PrivateAggregator.privacy_report(), with the cached epsilon
        return {"epsilon": self._epsilon[1], "delta": p.delta, "noise_multiplier": p.noise_multiplier,
                "clip_norm": p.clip_norm, "sample_rate": p.sample_rate, "privacy_steps": steps,
                "noise_std_per_step": p.sum_noise_multiplier * p.clip_norm * p.max_weight / p.denominator}

    def metrics_text(self) -> str:
        return observability.prometheus(self.status(), list(self.latency))

    def history(self, since: int = 0) -> list[dict]:
        with self.lock:
            return [e for e in self.evals if e["id"] > since]

