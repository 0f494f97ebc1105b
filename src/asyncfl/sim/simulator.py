"""The discrete-event simulator: a virtual clock over a heterogeneous device population.

It implements the scheduling policies' `Runtime`: it picks eligible devices, times their
trips (download, compute, upload, maybe a dropout), defers their training to the executor and
hands reports to the policy, which folds them in through the shared aggregator.
"""

from __future__ import annotations

import gc
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from asyncfl.algorithms.aggregators import Aggregator
from asyncfl.algorithms.norm_guard import NormGuard
from asyncfl.algorithms.seeds import download_rounding_generator, trip_seed, upload_rounding_generator
from asyncfl.algorithms.trainer import LocalTrainer
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict
from asyncfl.compression import ErrorFeedback, RunCodecs, encode_upload
from asyncfl.config import ExperimentConfig
from asyncfl.data.federated import FederatedDataset
from asyncfl.models.flat import FlatModel
from asyncfl.scheduling import WAKE, AsyncPolicy, SyncPolicy
from asyncfl.sim.evaluation import Evaluations
from asyncfl.sim.events import EventQueue
from asyncfl.sim.executor import Executor, TrainJob
from asyncfl.sim.metrics import Metrics, Target
from asyncfl.sim.population import Population, trip_timing
from asyncfl.sim.scores import Scores
from asyncfl.sim.secure_aggregation import SecureAggregation

FINISH, DROP, TIMER, EVAL, END = range(5)


@dataclass(slots=True)
class Trip(TrainJob):
    """A device's trip; it is also the job the executor trains (job_id is the trip's id)."""

    device: int = 0
    start: float = 0.0
    download_end: float = 0.0
    step_time: float = 0.0  # virtual seconds per local step on this device
    end: float = 0.0  # when it reports or drops
    # what the device downloaded besides the model (the aggregator's `downloads`: SCAFFOLD's c
    # as of the trip's start), like base_w; None for algorithms without per-client state
    base_extras: dict[str, torch.Tensor] | None = field(default=None, kw_only=True)


def payload_bytes(w: torch.Tensor) -> int:
    """Bytes of a dense float32 model or update on the wire."""
    return w.numel() * w.element_size()


@dataclass(frozen=True)
class RunParts:
    """The objects one simulated run is made of (`asyncfl.build` makes them from a config)."""

    model: FlatModel
    data: FederatedDataset
    trainer: LocalTrainer
    executor: Executor
    aggregator: Aggregator
    policy: AsyncPolicy | SyncPolicy
    client_rule: Any = None  # the algorithm's per-client state rule (`AlgorithmDefinition.client_rule`)
    upload_fields: tuple[str, ...] = ()  # tensors a client uploads besides its delta
    norm_guard: NormGuard | None = None  # refuses outsized updates (run.norm_guard; off by default)
    secure: SecureAggregation | None = None  # run.secure_aggregation: its costs and client encoding


DENSE = RunCodecs()  # no compression: dense float32 both ways


class Simulation:
    def __init__(
        self,
        parts: RunParts,
        cfg: ExperimentConfig,
        w0: torch.Tensor,
        codecs: RunCodecs = DENSE,
        progress: Callable[[float], None] | None = None,
    ):
        """`cfg` gives the population, evaluation, stop rule, target and seed; `codecs` the
        transfer encodings; `progress(t)` is called at every evaluation tick."""
        model, data, trainer = parts.model, parts.data, parts.trainer
        population, seed = cfg.population, cfg.seed
        self.model, self.data, self.trainer = model, data, trainer
        self.executor, self.aggregator, self.policy = parts.executor, parts.aggregator, parts.policy
        self.norm_guard = parts.norm_guard
        self.eval_cfg, self.stop, self.target = cfg.eval, cfg.stop, Target.of_config(cfg)
        self.seed = seed
        profile_ss, select_ss, drop_ss = np.random.SeedSequence(seed).spawn(3)
        self.population = Population(population, profile_ss)
        self.select_rng = np.random.default_rng(select_ss)
        self.drop_rng = np.random.default_rng(drop_ss)
        self.dropout = population.dropout
        self.retry_interval = population.retry_interval
        self.state = ServerState(w=w0.clone(), version=0)
        self.client_sizes = np.asarray(data.client_sizes())
        self.num_clients = data.num_clients
        self._work: dict[int, tuple[int, int]] = {}
        self.model_bytes = payload_bytes(w0)
        # compression: every transfer is charged its encoded payload's exact length (bytes_for is
        # exact and data independent, so trip timing can use it before encoding); without codecs,
        # dense float32 (model_bytes) both ways
        self.upload_codec, self.download_codec = codecs.upload, codecs.download
        self.download_bytes, self.upload_bytes = codecs.payload_bytes(w0.numel())
        # tensors that travel besides the model and the delta (SCAFFOLD's c down, its control
        # delta up) are charged dense float32, each the size of the model
        self.download_bytes += self.model_bytes * len(parts.aggregator.downloads(w0))
        self.upload_bytes += self.model_bytes * len(parts.upload_fields)
        self.secure = parts.secure
        if self.secure is not None:  # masked vectors (and protocol messages) replace the plain upload
            cost = self.secure.cost
            self.upload_bytes = cost.upload_bytes + self.secure.vector_bytes * len(parts.upload_fields)
            self.download_bytes += cost.extra_download_bytes
        self.error_feedback = ErrorFeedback(codecs.upload) if codecs.error_feedback and codecs.upload else None
        self._broadcast: tuple[int, torch.Tensor] | None = None  # (version, model as a lossy download decodes)
        # the algorithm's per-client state (`AlgorithmDefinition.client_rule`), kept only for the
        # devices whose updates were accepted: device -> tensor (SCAFFOLD's c_i)
        self.client_rule = parts.client_rule
        self.client_state: dict[int, torch.Tensor] = {}
        self.clock = 0.0
        self.events = EventQueue()
        self.trip_ids = itertools.count()
        self.trips: dict[int, Trip] = {}
        self.wake_pending = False
        self.metrics = Metrics()
        self.progress = progress
        self._draw_base, self._seeds, self._drops = 0, [], []
        self.evaluations = Evaluations(
            self.metrics,
            self.executor,
            data.x_test,
            data.y_test,
            self.target,
            at_once=self.stop.at_target,
            scores=Scores(cfg.eval.metrics, model) if cfg.eval.metrics else None,
        )
        # optional observer of trips, called as trace(event, trip) with event "start", "report"
        # (before the policy sees it; partial reports included), "drop" or "cancel": what another
        # runtime needs to replay this run (tests/test_parity.py)
        self.trace: Callable[[str, Trip], None] | None = None

    # ---- Runtime protocol -------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return len(self.trips)

    def request_clients(self, n: int) -> int:
        devices = self.population.pick(n, self.clock, self.select_rng)
        for d in devices:
            self._start_trip(d)
        if len(devices) < n:
            self._wake_later()
        return len(devices)

    def submit(self, trip: Trip, update: ClientUpdate) -> Verdict:
        staleness = self.state.version - update.base_version
        norm = None if self.norm_guard is None else float(torch.linalg.vector_norm(update.delta))
        if norm is not None and self.norm_guard.check(norm) is not None:
            verdict = Verdict.DISCARDED  # refused as the server refuses it (422 there)
        else:
            verdict = self.aggregator.submit(self.state, update, trip.base_w)
            if self.secure is not None:
                self.secure.reports += 1
            if norm is not None and verdict != Verdict.DISCARDED:
                self.norm_guard.accept(norm)
        self.metrics.on_verdict(verdict, staleness)
        if update.extras is not None and verdict != Verdict.DISCARDED:  # the device keeps what was accepted
            self.client_state[trip.device] = self.client_rule.advanced(
                self.client_state.get(trip.device), update.extras
            )
        if verdict == Verdict.STEPPED:
            self._after_step()
        return verdict

    def flush(self) -> bool:
        if self.secure is not None and not self.secure.round_unmasks():
            self.aggregator.discard()  # too few survivors: the round's sum stays masked
            return False
        stepped = self.aggregator.flush(self.state)
        if stepped:
            self._after_step()
        return stepped

    def cancel_in_flight(self) -> None:
        for trip_id in list(self.trips):
            trip = self._end_trip(trip_id)
            if self.trace is not None:
                self.trace("cancel", trip)
            self.executor.cancel(trip_id)
            self.metrics.cancelled += 1

    def expect_reports(self, n: int) -> None:
        """The trips that report after the first n are not trained ahead: a sync round with
        over-selection cancels them when it closes (a straggler timeout or a discarded update
        still gets any of them trained, when its result is asked for)."""
        reporting = sorted((t for t in self.trips.values() if t.reports), key=lambda t: t.end)
        for trip in reporting[n:]:
            trip.reports = False

    def collect_partial(self, limit: int) -> list[tuple[Trip, ClientUpdate]]:
        worked = []
        for trip in self.trips.values():
            steps = min(trip.steps, math.floor((self.clock - trip.download_end) / trip.step_time))
            if steps >= 1:
                worked.append((steps, trip))
        chosen = sorted(worked, key=lambda st: (-st[0], st[1].job_id))[: max(0, limit)]
        partial = []
        for steps, trip in sorted(chosen, key=lambda st: st[1].job_id):
            self._end_trip(trip.job_id)
            if self.trace is not None:
                self.trace("report", trip)
            self.executor.set_steps(trip.job_id, steps)
            self.metrics.completed += 1
            partial.append(trip)
        # all steps are set before any result is asked for, so a batched executor trains them in one pass
        return [(trip, self._update_of(trip)) for trip in partial]

    def set_timer(self, delay: float, payload: Any) -> None:
        self.events.push(self.clock + delay, TIMER, payload)

    # ---- trips ------------------------------------------------------------------------
    def _wake_later(self) -> None:
        if not self.wake_pending:
            self.wake_pending = True
            self.set_timer(self.retry_interval, WAKE)

    def _start_trip(self, device: int) -> None:
        """Runs once per trip (10^4 in flight, tens of thousands per second): plain Python on
        cached per-client work and pre-drawn blocks of seeds and dropout draws."""
        pop = self.population
        trip_id = next(self.trip_ids)
        client = device % self.num_clients
        work = self._work.get(client)
        if work is None:  # (steps, gradient examples per step), fixed per client
            n = int(self.client_sizes[client])
            work = self._work[client] = (self.trainer.num_steps(n), self.trainer.examples_per_step(n))
        steps, per_step = work
        download, step_time, duration = trip_timing(
            pop.compute_per_example.item(device),
            pop.download_bandwidth.item(device),
            pop.upload_bandwidth.item(device),
            steps,
            per_step,
            self.download_bytes,
            self.upload_bytes,
        )
        if self.secure is not None:
            duration += self.secure.cost.client_seconds
        seed, drop_at = self._trip_draws(trip_id)
        clock = self.clock
        end = clock + duration if drop_at is None else clock + drop_at * duration
        trip = Trip(
            trip_id,
            client,
            self.state.version,
            self._downloaded_model(),
            seed,
            steps,
            drop_at is None,
            device,
            clock,
            clock + download,
            step_time,
            end,
        )
        if self.client_rule is not None:
            trip.base_extras = self.aggregator.downloads(self.state.w)
            trip.correction = self.client_rule.correction(trip.base_extras, self.client_state.get(device))
        if pop.attack is not None and pop.attack.flips_labels and pop.malicious[device]:
            trip.flip_labels = True
        self.trips[trip_id] = trip
        pop.busy[device] = True
        metrics = self.metrics
        metrics.started += 1
        metrics.bytes_down += self.download_bytes
        self.executor.submit(trip)
        self.events.push(end, FINISH if drop_at is None else DROP, trip_id)
        if self.trace is not None:
            self.trace("start", trip)

    def _trip_draws(self, trip_id: int) -> tuple[int, float | None]:
        """(training seed, None or the fraction of its duration after which the trip drops),
        drawn in blocks of 4,096 trips: the seed is `trip_seed(experiment seed, trip id)`, the dropout
        comes from the dropout stream."""
        off = trip_id - self._draw_base
        if not 0 <= off < len(self._seeds):
            self._draw_base, off, n = trip_id, 0, 4096
            self._seeds = trip_seed(self.seed, np.arange(trip_id, trip_id + n)).tolist()
            u = self.drop_rng.random((n, 2))
            self._drops = np.where(u[:, 0] < self.dropout, u[:, 1], np.nan).tolist()
        drop = self._drops[off]
        return self._seeds[off], None if drop != drop else drop

    def _update_of(self, trip: Trip) -> ClientUpdate:
        """The update as the device sends it: an attacker corrupts what it trained; then it is
        encoded (with the device's error feedback), counted, and decoded as the server sees it."""
        update = self.executor.result(trip.job_id)
        pop = self.population
        if pop.attack is not None and pop.malicious[trip.device]:
            update.delta = pop.attack.corrupt(update.delta, trip.seed)
        if self.client_rule is not None:
            update.extras = self.client_rule.uploads(trip.base_extras, self.client_state.get(trip.device), update)
        sent = self.upload_bytes
        if self.upload_codec is not None:
            gen = upload_rounding_generator(trip.seed)
            if self.error_feedback is not None:  # every upload advances its device's residual
                payload, update.delta = self.error_feedback.encode(trip.device, update.delta, gen)
            else:
                payload, update.delta, _ = encode_upload(self.upload_codec, update.delta, gen)
            sent = len(payload)  # = upload_bytes, the trip's timing: encode_upload checks
        if self.secure is not None:  # quantized values then go through the fixed-point encoding
            update.delta = self.secure.encoding(update.delta, trip.seed)
            sent = self.upload_bytes
        self.metrics.bytes_up += sent
        return update

    def _downloaded_model(self) -> torch.Tensor:
        """The model a device starts from: the server's, or what a lossy download codec makes of
        it (encoded once per version, as a server would broadcast it)."""
        codec = self.download_codec
        if codec is None or codec.lossless:
            return self.state.w
        if self._broadcast is None or self._broadcast[0] != self.state.version:
            gen = download_rounding_generator(self.seed, self.state.version)
            payload = codec.encode(self.state.w, gen)
            if len(payload) != self.download_bytes:
                raise RuntimeError(f"{codec.spec}: payload of {len(payload)} bytes, charged {self.download_bytes}")
            self._broadcast = (self.state.version, codec.decode(payload, self.state.w.numel()))
        return self._broadcast[1]

    def _end_trip(self, trip_id: int) -> Trip:
        trip = self.trips.pop(trip_id)
        self.population.busy[trip.device] = False
        return trip

    # ---- evaluation -------------------------------------------------------------------
    def _after_step(self) -> None:
        if self.secure is not None:
            self.secure.on_step()
        every = self.eval_cfg.every_versions
        if every and self.state.version - self.evaluations.last_version >= every:
            self._evaluate()

    def _evaluate(self) -> None:
        privacy = self.aggregator.privacy_report()
        epsilon = privacy["epsilon"] if privacy is not None else None
        self.evaluations.record(self.clock, self.state.version, self.state.w, epsilon)

    # ---- main loop --------------------------------------------------------------------
    def run(self) -> Metrics:
        # what exists before the run (data, population, models) is long-lived: keep it out of
        # the cyclic collector's full passes, which otherwise walk it again and again as trips
        # allocate. The run's own objects (trips, events, updates) hold no cycles and die by
        # reference counting, so the young generation is collected every 50,000 allocations
        # instead of 700: each collection scans the trips in flight (10^4 at a time)
        gc.freeze()
        threshold = gc.get_threshold()
        gc.set_threshold(max(threshold[0], 50_000), *threshold[1:])
        try:
            return self._run()
        finally:
            gc.set_threshold(*threshold)
            gc.unfreeze()

    def _run(self) -> Metrics:
        self.evaluations.wall0 = time.perf_counter()
        self._evaluate()
        if self.eval_cfg.every_seconds:
            self.events.push(self.eval_cfg.every_seconds, EVAL, None)
        self.events.push(self.stop.max_time, END, None)
        self.policy.start(self)
        events, trips, metrics, policy, pop = self.events, self.trips, self.metrics, self.policy, self.events.pop
        max_trips = math.inf if self.stop.max_trips is None else self.stop.max_trips
        at_target = self.stop.at_target
        evaluations = self.evaluations
        while events and metrics.started < max_trips and not (at_target and evaluations.reached_target):
            t, kind, payload = pop()
            self.clock = t
            if kind <= DROP:  # the common case first: a trip ends, unless it was cancelled meanwhile
                if payload not in trips:
                    continue
                trip = self._end_trip(payload)
                if self.trace is not None:
                    self.trace("report" if kind == FINISH else "drop", trip)
                if kind == DROP:
                    self.executor.cancel(payload)
                    metrics.dropped += 1
                    policy.on_lost(self, trip)
                else:
                    metrics.completed += 1
                    policy.on_report(self, trip, self._update_of(trip))
            elif kind == END:
                break
            elif kind == EVAL:
                self._evaluate()
                events.push(t + self.eval_cfg.every_seconds, EVAL, None)
                if self.progress:
                    self.progress(t)
            else:  # TIMER
                if payload == WAKE:
                    self.wake_pending = False
                policy.on_timer(self, payload)
        if self.metrics.rows[-1]["virtual_time"] < self.clock or self.metrics.rows[-1]["version"] != self.state.version:
            self._evaluate()
        evaluations.score()
        self.metrics.wall_seconds = time.perf_counter() - evaluations.wall0
        self.metrics.virtual_time = self.clock
        self.metrics.server_steps = self.state.version
        self.metrics.client_updates = self.executor.trained
        self.metrics.extra.update(self._transport_summary())
        return self.metrics

    def _transport_summary(self) -> dict:
        """Summary fields for codecs and privacy (epsilon null without DP noise)."""
        up, down = self.upload_codec, self.download_codec
        out = {
            "codec": up.spec if up else None,
            "codec_download": down.spec if down else None,
            "error_feedback": self.error_feedback is not None,
            "upload_payload_bytes": self.upload_bytes,
            "download_payload_bytes": self.download_bytes,
            "epsilon": None,
        }
        privacy = self.aggregator.privacy_report()
        if privacy is not None:
            out.update(privacy)
        if self.secure is not None:
            out.update(self.secure.summary())
        return out
