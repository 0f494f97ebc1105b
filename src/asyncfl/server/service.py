"""One process hosting the three roles (selector, coordinator, aggregator) over one store.

The roles talk through plain method calls under one state lock (`shared.Shared`); every change
becomes durable through one group commit (`durability.GroupCommit`) before a request answers.
`FLServer` composes the parts: upload handling (`uploads`), evaluation (`evaluation`) and the
status view (`status`). Splitting the roles across processes later means replacing the method
calls with RPCs; none of them touches HTTP, which lives in app.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

from asyncfl import wire
from asyncfl.algorithms.defs.registry import definition
from asyncfl.algorithms.seeds import download_rounding_generator
from asyncfl.build import (
    build_aggregator,
    build_data,
    build_flat_model,
    build_norm_guard,
    build_trainer,
    client_options,
    num_users,
)
from asyncfl.compression import parse_codec
from asyncfl.config import ConfigError, ExperimentConfig, RunSpec
from asyncfl.scheduling import build_policy
from asyncfl.server.aggregation import AggregationRole, AggregationSettings
from asyncfl.server.auth import Authenticator, RateLimiter, admit
from asyncfl.server.coordinator import Coordinator
from asyncfl.server.durability import STATE_FORMAT, GroupCommit
from asyncfl.server.errors import ApiError
from asyncfl.server.evaluation import Evaluation
from asyncfl.server.limits import body_limit
from asyncfl.server.reports import STEPS_MARGIN, ReportBounds
from asyncfl.server.secure_rounds import build_secure_policy
from asyncfl.server.selector import Selector
from asyncfl.server.settings import ServerConfig
from asyncfl.server.shared import Counters, Shared
from asyncfl.server.status import StatusView
from asyncfl.server.store import Store
from asyncfl.server.tsa_buffer import tsa_serving
from asyncfl.server.uploads import Uploads

log = logging.getLogger("asyncfl.server")
PROTOCOL = 1
HISTORY_LIMIT, HISTORY_MAX_LIMIT = 1000, 10_000  # evaluations per /v1/history page: default, most


def report_bounds(cfg: ExperimentConfig, spec: RunSpec, settings: ServerConfig, data, model) -> ReportBounds:
    """What an upload may report: n_examples up to server.max_examples, else the task's
    largest client partition; steps up to STEPS_MARGIN x what the trainer plans for that
    many examples."""
    max_examples = settings.max_examples or int(data.client_sizes().max())
    max_steps = STEPS_MARGIN * build_trainer(cfg, spec, model).num_steps(max_examples)
    return ReportBounds(max_examples, max_steps, settings.max_loss, definition(spec.algorithm.name).reported)


def describe_task(task: str, served) -> dict:
    """What a client needs to build the same model and trainer as the simulator (GET /v1/task),
    from what serves the task (the single process's FLServer or a selector's ServedTask: the same
    attribute names): the codec uploads must use, the largest upload accepted, the TSA's terms."""
    cfg, spec, model, data = served.cfg, served.spec, served.model, served.data
    algorithm = definition(spec.algorithm.name)
    download_codec, tsa = served.download_codec, served.tsa
    info = {
        "protocol": PROTOCOL,
        "task": task,
        "run": spec.name,
        "config": cfg.model_copy(update={"runs": [spec]}).model_dump(mode="json"),
        "num_features": data.num_features,
        "num_classes": data.num_classes,
        "prox_mu": client_options(spec).prox_mu,
        # per-client state the client keeps between trips, and what it uploads besides its delta
        "client_state": algorithm.client_state,
        "upload_fields": list(algorithm.upload_fields),
        "tensors": [{"name": n, "shape": list(s)} for n, s in zip(model.names, model.shapes)],
        "codecs": [served.aggregation.expected_codec or "none"],
        "download_codec": download_codec.spec if download_codec is not None else "none",
        "max_body_bytes": served.max_body_bytes,
    }
    return info | ({} if tsa is None else {"secure_aggregation": tsa.advertised()})


def model_frame_bytes(seed: int, version: int, w, model, download_codec, extras: dict) -> bytes:
    """A version's frame: raw float32, or with a lossy download codec its payload, stochastic
    rounding seeded from (experiment seed, version) as in the simulator; followed by what the
    aggregator sends with that version (SCAFFOLD's c; raw)."""
    gen = None if download_codec is None else download_rounding_generator(seed, version)
    return wire.encode_model(version, w, model.names, model.shapes, download_codec, gen, extras)


def fingerprint(cfg: ExperimentConfig, run: str, task: str) -> str:
    """What must not change under a state dir: data, model, algorithm, schedule, seed."""
    tree = cfg.model_dump(mode="json")
    tree = {k: tree[k] for k in ("seed", "data", "model", "trainer")} | {
        "run": cfg.run(run).model_dump(mode="json"),
        "task": task,
    }
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def require_served_sample_rate(spec: RunSpec) -> None:
    """ConfigError for a noisy run without privacy.sample_rate: a server cannot know how many
    users will take part, so it cannot derive the rate epsilon is accounted at."""
    privacy = spec.privacy
    if privacy is not None and privacy.noise_multiplier > 0 and privacy.sample_rate is None:
        raise ConfigError(
            f"run {spec.name!r}: privacy.sample_rate is required by `asyncfl serve`: the server cannot know how "
            "many users will take part, so it cannot derive the rate epsilon is accounted at; set it to the "
            "expected share of all users contributing to one server step (e.g. buffer_size / users)"
        )


class FLServer:
    def __init__(self, cfg: ExperimentConfig, settings: ServerConfig, state_dir: str | Path, run: str | None = None):
        self.cfg, self.settings = cfg, settings
        self.spec = cfg.run(run)
        self.task = settings.task or self.spec.name
        require_served_sample_rate(self.spec)
        self.data = build_data(cfg)
        self.model = build_flat_model(cfg, self.data)
        comp = self.spec.compression
        self.upload_codec = parse_codec(comp.upload) if comp is not None else None
        download = parse_codec(comp.download) if comp is not None else None
        self.download_codec = download if download is not None and not download.lossless else None
        self.store = Store(state_dir)
        self.algorithm = definition(self.spec.algorithm.name)
        max_examples = settings.max_examples or int(self.data.client_sizes().max())
        self.tsa = tsa_serving(self.spec, settings, self.model.numel, max_examples)
        if self.tsa is not None:
            aggregator = self.tsa.aggregator
        else:
            aggregator = build_aggregator(self.spec, cfg.trainer.lr, num_users=num_users(cfg, self.data), seed=cfg.seed)
        w0 = self.model.initial_weights()
        self.aggregation = AggregationRole(
            aggregator,
            w0,
            AggregationSettings(
                self.model.names,
                self.model.shapes,
                settings.max_update_norm,
                settings.keep_versions,
                self.upload_codec,
                comp.upload if comp is not None else None,
                self.algorithm.upload_fields,
                None if self.tsa is None else self.tsa.frames,
            ),
            build_norm_guard(settings.norm_guard, w0) if self.tsa is None else None,  # norms are masked
        )
        self.max_body_bytes = body_limit(settings, self.aggregation)
        bounds = report_bounds(cfg, self.spec, settings, self.data, self.model)
        # sync SecAgg rounds, else None
        self.secure_rounds = build_secure_policy(self.spec, settings, aggregator, self.model.numel, bounds)
        self.policy = self.secure_rounds or build_policy(self.spec.scheduler)
        self.coordinator = Coordinator(self.policy, self.aggregation, settings.lease_timeout, cfg.seed)
        self.shared = Shared(self.store, threading.RLock(), self.aggregation, self.coordinator, Counters())
        self.lock = self.shared.lock
        self.commit = GroupCommit(self.shared, self._restore)
        self.unmasker = None if self.tsa is None else self.tsa.unmasker(self.shared, self.commit)
        vet = None if self.unmasker is None else self.unmasker.link.vet
        self.uploads = Uploads(self.shared, self.commit, bounds, self.algorithm.name, vet)
        self.evaluation = Evaluation(self.shared, self.model, self.data, cfg.target_accuracy, settings.eval_every_s)
        self.view = StatusView(self)
        self.selector = Selector(self.coordinator, settings.retry_after, lambda: self.done)
        self.auth = Authenticator(self.store, self.task)
        self.limiter = RateLimiter(settings.rate_per_s, settings.rate_burst)
        self.anonymous = RateLimiter(settings.anonymous_rate_per_s, settings.anonymous_burst, "address")
        self.started = time.time()
        self._frames: dict[int, bytes] = {}
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._open(fingerprint(cfg, self.spec.name, self.task))

    # ---- start-up ---------------------------------------------------------------------
    def _open(self, fp: str) -> None:
        saved = self.store.get_meta("fingerprint")
        if saved is None:
            self.policy.start(self.coordinator)
            self.commit.initial = fp
            self.commit.sync(self.commit.epoch)
            return
        found = self.store.get_meta("state_format", 1)
        if found != STATE_FORMAT:
            raise ConfigError(
                f"state dir {self.store.dir} was written in state format {found}; this server reads "
                f"format {STATE_FORMAT} only; use a fresh --state-dir"
            )
        if saved != fp:
            raise ConfigError(
                f"state dir {self.store.dir} holds a run with another configuration "
                f"(fingerprint {saved}, this one {fp}); use a fresh --state-dir"
            )
        self._restore()

    def _restore(self) -> None:
        """Every part back to the last durable state (at start-up, and after a failed commit)."""
        self.aggregation.restore(self.store)
        self.coordinator.restore(self.store)
        if self.secure_rounds is not None:
            self.secure_rounds.restored(self.coordinator)
        self.shared.counters.restore(self.store)
        self.evaluation.restore()
        self.uploads.restore()
        self._frames.clear()
        self.commit.reset()

    # ---- requests ---------------------------------------------------------------------
    def authenticate(self, authorization: str | None, address: str) -> str:
        """The client behind a request; requests without a valid client token count against
        their address's bucket, and get 429 once it is empty."""
        return self._limited(lambda: self.auth.client_of(authorization), address, self.limiter)

    def authorize_operator(self, authorization: str | None, cookie: str | None, address: str) -> str:
        return self._limited(lambda: self.auth.operator_of(authorization, cookie), address)

    def _limited(self, identify, address: str, per_name: RateLimiter | None = None) -> str:
        try:
            return admit(identify, address, self.anonymous, per_name)
        except ApiError as err:
            self.reject(err)
            raise

    def reject(self, err: ApiError) -> None:
        self.shared.counters.rejected[err.code] += 1

    @property
    def done(self) -> bool:
        stop = self.cfg.stop
        if stop.at_target and self.evaluation.reached_target:
            return True
        return stop.max_trips is not None and self.coordinator.issued >= stop.max_trips

    def checkin(self, client: str, eligible: bool = True) -> dict:
        """A new lease is durable before the client hears of it (leases survive restarts)."""
        with self.lock:
            if self.tsa is not None and not self.done and self.tsa.aggregator.waiting():
                return {"action": "retry", "retry_after": self.settings.retry_after, "reason": "waiting for the TSA"}
            fired, issued = self.coordinator.fire_due_timers(), self.coordinator.issued
            answer, _ = self.selector.checkin(client, eligible)
            epoch = self.commit.epoch if fired or self.coordinator.issued != issued else None
        if epoch is not None:
            self.commit.sync(epoch)
        return answer

    def task_info(self) -> dict:
        """What a client needs to build the same model and trainer as the simulator."""
        return describe_task(self.task, self)

    def model_frame(self, version: int) -> bytes:
        """A version's frame (`model_frame_bytes`), built once."""
        with self.lock:
            frame = self._frames.get(version)
            if frame is None:
                if version not in self.aggregation.models:
                    raise ApiError(
                        404,
                        "version_unavailable",
                        f"model version {version} is not available; "
                        f"current version is {self.aggregation.state.version}",
                    )
                w = self.aggregation.models[version]
                extras = self.aggregation.downloads_of(version)
                if extras is None:
                    raise ApiError(
                        404,
                        "version_unavailable",
                        f"model version {version} is no longer available with "
                        f"what it needs besides the model; current version is "
                        f"{self.aggregation.state.version}",
                    )
        if frame is None:
            frame = model_frame_bytes(self.cfg.seed, version, w, self.model, self.download_codec, extras)
            with self.lock:
                if len(self._frames) > 4:
                    self._frames.pop(min(self._frames))
                self._frames[version] = frame
        with self.lock:
            self.shared.counters.traffic["download_bytes"] += len(frame)
            self.shared.counters.traffic["downloads"] += 1
        return frame

    def upload(self, client: str, body: bytes) -> tuple[int, dict]:
        return self.uploads.upload(client, body)

    # ---- background: timers, leases, evaluation ---------------------------------------
    def tick(self) -> None:
        with self.lock:
            epoch = self.commit.epoch if self.coordinator.tick() else None
            obsolete = self.commit.take_obsolete()
        if epoch is not None:
            self.commit.sync(epoch)
        self.store.remove_files(obsolete)
        self.evaluation.maybe_evaluate()

    def start_background(self, period: float = 0.1) -> None:
        def loop():
            while not self._stop.wait(period):
                try:
                    self.tick()
                except Exception:  # keep serving; the failure is logged
                    log.exception("background tick failed")

        self._ticker = threading.Thread(target=loop, name="asyncfl-ticker", daemon=True)
        self._ticker.start()
        if self.unmasker is not None:
            self.unmasker.start()

    def close(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(timeout=5)
        if self.unmasker is not None:
            self.unmasker.stop()
        try:
            self.commit.sync(self.commit.epoch)  # the rejection counters
        except ApiError:
            pass
        self.store.close()

    # ---- observability ----------------------------------------------------------------
    def status(self) -> dict:
        return self.view.status()

    def metrics_text(self) -> str:
        return self.view.metrics_text()

    def history(self, since: int = 0, limit: int = HISTORY_LIMIT) -> dict:
        """Evaluations after id `since`, at most `limit`; `next` is the `since` of the next page
        (None on the last one)."""
        rows = self.evaluation.history(since)
        return {"evals": rows[:limit], "next": rows[limit - 1]["id"] if len(rows) > limit else None}
