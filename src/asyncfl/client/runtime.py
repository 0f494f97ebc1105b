"""The client runtime: check in when eligible, download the leased model version,
train with the same LocalTrainer the simulator uses, upload the update with its base version,
an idempotency key and the example count, repeat.

With a run's `compression:` section the client encodes its delta with the upload codec (the
same `asyncfl.compression` objects the simulator uses; stochastic rounding seeded from the
lease's seed) and, with `error_feedback`, keeps what the codec dropped and adds it to its next
update. The residual advances only when the server accepted the update: an upload that did not
count (lost lease, stale, rejected) leaves the residual as it was before that trip. A lossy
download codec's model frames are decoded here (validated like uploads on the server).

An algorithm with per-client state (its definition's `client_state`: SCAFFOLD's control
variate c_i) keeps it in a file (`state_path`, by default next to the ack log), so that a
restarted client continues with it; what the server sends with the model (SCAFFOLD's c) comes
in the model frame, and the upload carries the definition's `upload_fields` besides the delta.
Like the residual, the state advances only when the server accepted the update.

A sync run with `secure_aggregation` (secagg_plus, secagg) never receives a plain update: after
training, the client takes part in its lease's secure round (client/secure.py) with its update
clipped and encoded, weighted by its example count.

An upload is re-sent with the same bytes and key until the server answers, so a server
restart mid-trip costs time, never a double count: the server answers a re-send with the
first result.
"""

from __future__ import annotations

import importlib
import json
import math
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from asyncfl import wire
from asyncfl.algorithms.defs.registry import definition
from asyncfl.algorithms.seeds import upload_rounding_generator
from asyncfl.attacks import Attack, flip_labels
from asyncfl.build import build_client_rule, build_data, build_flat_model, build_trainer
from asyncfl.client.http import GaveUp, ServerApi
from asyncfl.client.masking import TsaMasking, tsa_masking
from asyncfl.client.secure import SecureRound
from asyncfl.compression import ErrorFeedback, Raw, encode_upload, parse_codec
from asyncfl.compression.error_feedback import Upload
from asyncfl.config import ConfigError, validate
from asyncfl.config.secure_aggregation import SYNC_PROTOCOLS
from asyncfl.plugins import load_device_data


class ClientError(RuntimeError):
    """A problem retrying cannot fix (bad token, bad data spec, incompatible server)."""


def load_data(spec: str, cfg, num_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`DATASET:client=K` (partition K of the task's own split of its dataset, e.g.
    digits:client=3), `package.module:function` (the user's loader, returning (x, y) or a torch
    Dataset; x keeps its example shape) or a path to an .npz with arrays `x` [n, features] and
    `y` [n] (integer labels): the user's own data."""
    name, sep, rest = spec.partition(":")
    if sep and "=" not in rest and not Path(spec).is_file():
        try:
            x, y = load_device_data(spec)
        except ConfigError as err:
            raise ClientError(str(err)) from None
        if x[0].numel() != num_features:
            raise ClientError(
                f"--data {spec}: examples of shape {list(x.shape[1:])}; the task has {num_features} features"
            )
        return x, y
    if sep and not Path(spec).is_file():
        key, _, value = rest.partition("=")
        if name != cfg.data.dataset:
            raise ClientError(f"--data {spec!r}: this task trains on {cfg.data.dataset!r}")
        if key != "client" or not value.isdigit():
            raise ClientError(f"--data {spec!r}: expected {cfg.data.dataset}:client=K")
        data = build_data(cfg)
        k = int(value)
        if k >= data.num_clients:
            raise ClientError(
                f"--data {spec!r}: the task has {data.num_clients} partitions (0..{data.num_clients - 1})"
            )
        return data.client_data(k)
    path = Path(spec)
    if not path.is_file():
        raise ClientError(f"--data {spec!r}: not DATASET:client=K and no such file")
    with np.load(path) as z:
        if "x" not in z or "y" not in z:
            raise ClientError(f"{path}: an .npz with arrays 'x' and 'y' is expected, found {sorted(z.files)}")
        x, y = np.asarray(z["x"], dtype=np.float32), np.asarray(z["y"]).astype(np.int64)
    x = x.reshape(len(x), -1)
    if x.shape[1] != num_features or len(x) != len(y) or len(y) == 0:
        raise ClientError(f"{path}: x must be [n, {num_features}] and y [n] with n > 0; got {x.shape}, {y.shape}")
    return torch.from_numpy(x), torch.from_numpy(y)


def load_hook(path: str | None) -> Callable[[], bool]:
    """The eligibility hook, `module:function` returning True when the device may train
    (idle, charging, unmetered network...). Default: always eligible."""
    if not path:
        return lambda: True
    mod, _, fn = path.partition(":")
    return getattr(importlib.import_module(mod), fn)


class ClientRuntime:
    def __init__(
        self,
        api: ServerApi,
        data: str,
        eligible: Callable[[], bool] | None = None,
        ack_log: str | Path | None = None,
        max_trips: int | None = None,
        idle_wait: float = 5.0,
        log: Callable[[str], None] = lambda s: None,
        state_path: str | Path | None = None,
        attack: Attack | None = None,
        tsa_key: str | None = None,
    ):
        """`attack`: make this a malicious client (testing defences): it corrupts every update
        it sends, or trains on flipped labels, as `asyncfl.attacks` defines it."""
        self.api, self.data_spec = api, data
        self.attack = attack
        self.eligible = eligible or (lambda: True)
        self.ack_log = Path(ack_log) if ack_log else None
        self.max_trips, self.idle_wait, self.log = max_trips, idle_wait, log
        self.stats = {"trips": 0, "accepted": 0, "discarded": 0, "lost": 0, "rejected": 0}
        self.sec_per_step: float | None = None
        self.upload_codec = None  # set by setup() from the task's compression section
        self.upload_spec = "none"
        self.error_feedback: ErrorFeedback | None = None
        self.model_codecs = None  # decoders for model frames (None: raw only)
        self.upload_payload_bytes: list[int] = []  # payload length of each upload sent
        self.state_path = Path(state_path) if state_path else None
        self.client_rule = None  # set by setup() for algorithms with per-client state
        self.own_state: torch.Tensor | None = None  # that state (None: never accepted yet, zeros)
        self.secure: SecureRound | None = None  # set by setup() for sync secure aggregation
        self.tsa_key = tsa_key  # the pinned TSA public key (base64)
        self.masking: TsaMasking | None = None  # set by setup() when the task masks uploads for a TSA

    # ---- set-up ----------------------------------------------------------------------
    def _json(self, resp) -> dict:
        try:
            return resp.json()
        except ValueError:
            return {"error": "http", "detail": resp.text[:200]}

    def _fatal(self, resp) -> None:
        if resp.status_code in (401, 403):
            body = self._json(resp)
            raise ClientError(
                f"server refused the token ({resp.status_code} {body.get('error')}: {body.get('detail')})"
            )

    def setup(self) -> None:
        resp = self.api.request("GET", "/v1/task")
        self._fatal(resp)
        if resp.status_code != 200:
            raise ClientError(f"GET /v1/task: {resp.status_code} {resp.text[:200]}")
        task = resp.json()
        cfg = validate(task["config"])
        self.x, self.y = load_data(self.data_spec, cfg, task["num_features"])
        if self.attack is not None and self.attack.flips_labels:
            self.y = flip_labels(self.y, task["num_classes"])
        # what build_flat_model reads of a dataset; the local data stands in for the test split.
        # Examples with a shape (images from a loader) are stored flat, as the server does
        example_shape = tuple(self.x.shape[1:]) if self.x.dim() > 2 else None
        self.x = self.x.reshape(len(self.x), -1)
        shape = SimpleNamespace(
            num_features=task["num_features"],
            num_classes=task["num_classes"],
            x=self.x,
            x_test=self.x,
            example_shape=example_shape,
        )
        try:
            self.model = build_flat_model(cfg, shape)
        except ConfigError as err:  # the task's model plug-in against this device's data
            raise ClientError(str(err)) from None
        self.trainer = build_trainer(cfg, cfg.runs[0], self.model)  # the simulator's trainer, same settings
        if [list(s) for s in self.model.shapes] != [x["shape"] for x in task["tensors"]]:
            raise ClientError("the model built from the task config does not match the server's tensors")
        self._setup_state(task, cfg)
        secure = cfg.runs[0].secure_aggregation
        if secure is not None and secure.protocol in SYNC_PROTOCOLS:
            self.secure, self.secure_clip = SecureRound(self.api, self.log), secure.clip_range
        try:
            self.masking = tsa_masking(task, self.tsa_key)
        except ValueError as err:
            raise ClientError(str(err)) from None
        if self.masking is not None:
            self.upload_spec = self.masking.spec
        comp = cfg.runs[0].compression
        if comp is not None:
            codec = parse_codec(comp.upload)
            if not isinstance(codec, Raw):  # masked uploads keep the masked frame's spec
                self.upload_codec = codec
                self.upload_spec = self.upload_spec if self.masking is not None else comp.upload
                self.error_feedback = ErrorFeedback(codec) if comp.error_feedback else None
            down = parse_codec(comp.download)
            if not down.lossless:
                raw = {name: pair[1] for name, pair in wire.CODECS.items()}
                self.model_codecs = raw | {down.spec: wire.compressed_decoder(down)}

    def _setup_state(self, task: dict, cfg) -> None:
        """The algorithm's per-client state, from its file when a previous run left one."""
        algorithm = definition(cfg.runs[0].algorithm.name)
        if list(algorithm.upload_fields) != task.get("upload_fields", []):
            raise ClientError(
                f"the server expects upload fields {task.get('upload_fields', [])}, this client sends "
                f"{list(algorithm.upload_fields)}: update the client"
            )
        self.client_rule = build_client_rule(cfg.runs[0], cfg.trainer.lr)
        if self.client_rule is None:
            return
        self.state_name, self.task_name = algorithm.client_state, task["task"]
        if self.state_path is None:
            if self.ack_log is None:
                raise ClientError(
                    f"task {task['task']!r} keeps per-client state ({algorithm.client_state}) between "
                    "trips: give --state PATH (or --ack-log, next to which it is kept)"
                )
            self.state_path = self.ack_log.with_name(self.ack_log.name + ".state.pt")
        if self.state_path.is_file():
            saved = torch.load(self.state_path, weights_only=True)
            own = saved["state"].get(self.state_name)
            if saved.get("task") != self.task_name or own is None or own.shape != (self.model.numel,):
                raise ClientError(f"{self.state_path} holds state of another task or model; use another --state")
            self.own_state = own

    def _save_state(self) -> None:
        """Atomically: a crash leaves the old file or the new one, never half of one."""
        tmp = self.state_path.with_name(self.state_path.name + ".tmp")
        torch.save({"task": self.task_name, "state": {self.state_name: self.own_state}}, tmp)
        tmp.replace(self.state_path)

    # ---- one trip --------------------------------------------------------------------
    def trip(self) -> str:
        """Check in and, when assigned, train and upload once. Returns the check-in action."""
        task = self.check_in()
        if task["action"] == "train":
            self.train_and_upload(task)
        elif task["action"] == "retry":
            time.sleep(task["retry_after"])
        return task["action"]

    def check_in(self) -> dict:
        """The server's answer: a lease to train on (action "train"), "retry" or "stop"."""
        resp = self.api.request("POST", "/v1/checkin", json={"eligible": True})
        self._fatal(resp)
        if resp.status_code != 200:
            raise ClientError(f"check-in: {resp.status_code} {resp.text[:200]}")
        return resp.json()

    def train_and_upload(self, task: dict) -> dict | None:
        """Download the leased version, train on it with the lease's seed and upload the update.
        Returns the server's answer to the upload (with its HTTP status under "http"), or None
        when the download failed and nothing was sent."""
        resp = self.api.request("GET", task["model_url"])
        self._fatal(resp)
        if resp.status_code != 200:
            self.log(f"download failed: {resp.status_code} {resp.text[:200]}")
            self.stats["lost"] += 1
            return None
        try:
            frame = wire.decode(resp.content, wire.ModelHeader, self.model_codecs)
            arrays, downloaded = wire.split_fields(
                frame.arrays, self.model.names, wire.fields_of(frame.header.tensors, self.model.names)
            )
        except wire.WireError as err:
            self.log(f"unreadable model download: {err}")
            self.stats["lost"] += 1
            return None
        if frame.header.version != task["base_version"]:
            raise ClientError(f"asked for version {task['base_version']}, got {frame.header.version}")
        w0 = wire.join_flat(arrays)
        rule, own = self.client_rule, self.own_state
        steps = self._step_budget(task.get("round_deadline_in"))
        t0 = time.perf_counter()
        update = self.trainer.train(
            w0,
            self.x,
            self.y,
            seed=task["seed"],
            base_version=task["base_version"],
            steps=steps,
            correction=None if rule is None else rule.correction(downloaded, own),
        )
        self.sec_per_step = (time.perf_counter() - t0) / max(1, update.steps)
        self.stats["trips"] += 1
        key = uuid.uuid4().hex
        if self.attack is not None:  # seeded from the lease, as the simulator seeds it from the trip
            update.delta = self.attack.corrupt(update.delta, task["seed"])
        extras = None if rule is None else rule.uploads(downloaded, own, update)
        if self.secure is not None:
            return self._secure_upload(task, update, key, extras)
        if self.masking is not None:
            values, residual = self._quantized(update.delta, task["seed"])
            payload = self.masking.payload(values, task["seed"], task["lease_id"])
        else:
            upload, residual = self._codec_upload(update.delta, task["seed"])
            payload = None if upload is None else upload.payload
        body = wire.encode_update(
            lease_id=task["lease_id"],
            base_version=update.base_version,
            idempotency_key=key,
            n_examples=update.n_examples,
            steps=update.steps,
            planned_steps=update.planned_steps,
            loss=update.loss,
            start_loss=update.start_loss,
            delta=update.delta,
            names=self.model.names,
            shapes=self.model.shapes,
            payload=payload,
            codec=self.upload_spec,
            extras=extras,
        )
        self.upload_payload_bytes.append(wire.payload_length(body))
        resp = self.api.request(
            "POST", "/v1/update", content=body, headers={"Content-Type": "application/vnd.asyncfl.frame"}
        )
        self._fatal(resp)
        answer = self._json(resp)
        if resp.status_code == 200:
            if residual is not None:  # the server counted what it decoded: keep what it dropped
                self.error_feedback.record("self", *residual)
            if extras is not None:  # the server counted it: the per-client state advances, durably
                self.own_state = rule.advanced(own, extras)
                self._save_state()
            self.stats["accepted"] += 1
        else:
            self._count_refusal(resp.status_code, answer)
        return self._acknowledged({**answer, "key": key, "lease": task["lease_id"], "http": resp.status_code})

    def _count_refusal(self, status: int, answer: dict) -> None:
        if answer.get("error") == "stale":
            self.stats["discarded"] += 1
        elif answer.get("error", "").startswith("lease") or answer.get("error") == "no_lease":
            self.stats["lost"] += 1
        else:
            self.stats["rejected"] += 1
            self.log(f"upload rejected: {status} {answer}")

    def _acknowledged(self, ack: dict) -> dict:
        if self.ack_log is not None:
            with open(self.ack_log, "a") as f:
                f.write(json.dumps(ack) + "\n")
        return ack

    def _quantized(self, delta: torch.Tensor, seed: int) -> tuple[torch.Tensor, tuple | None]:
        """Under secure aggregation, the values a quantizing upload codec sends (they compose with
        the fixed-point encoding, which then masks them), the delta itself without such a codec;
        and the error-feedback pair to record once the update is accepted (see `_codec_upload`)."""
        upload, residual = self._codec_upload(delta, seed)
        return (delta if upload is None else upload.decoded), residual

    def _secure_upload(self, task: dict, update, key: str, extras: dict | None) -> dict:
        """The trip's update through a secure-aggregation round: a quantizing upload codec's
        values, clipped and encoded, masked; the outcome is the round's. Per-client state
        advances by the upload fields as the server summed them: clipped to the range."""
        values, residual = self._quantized(update.delta, task["seed"])
        if extras is not None:
            extras = {name: t.clamp(-self.secure_clip, self.secure_clip) for name, t in extras.items()}
        seen = self.secure.contribute(task, values.numpy(), update.n_examples, update.steps, extras)
        outcome = seen.get("outcome", {})
        if outcome.get("status") == "accepted":
            if self.error_feedback is not None:
                self.error_feedback.record("self", *residual)
            if extras is not None:  # as after a plain accepted upload: the state advances, durably
                self.own_state = self.client_rule.advanced(self.own_state, extras)
                self._save_state()
            self.stats["accepted"] += 1
        elif seen.get("http", 409) != 409:  # a refused message (a conflict means the round went on without it)
            self._count_refusal(seen["http"], seen)
        else:
            self.stats["lost"] += 1  # dropped out of, or left, a round, or the round failed
        return self._acknowledged(
            {**outcome, **seen, "key": key, "lease": task["lease_id"], "http": seen.get("http", 200)}
        )

    def _codec_upload(self, delta: torch.Tensor, seed: int) -> tuple[Upload | None, tuple | None]:
        """The upload codec's encoding of `delta` (None without compression) and, with error
        feedback, (compensated, decoded) to record once the server has accepted it."""
        if self.upload_codec is None:
            return None, None
        gen = upload_rounding_generator(seed)  # as the simulator seeds it
        upload = encode_upload(self.upload_codec, delta, gen, self.error_feedback, "self")
        return upload, None if self.error_feedback is None else (upload.compensated, upload.decoded)

    def _step_budget(self, deadline_in: float | None) -> int | None:
        """With a round deadline (sync, partial stragglers) take only the steps that fit:
        the server cannot pull partial work, so the client sends it in time."""
        if deadline_in is None or self.sec_per_step is None:
            return None
        full = self.trainer.num_steps(len(self.y))
        fit = math.floor(0.8 * deadline_in / max(self.sec_per_step, 1e-6))
        return max(1, min(full, fit))

    def run(self) -> dict:
        self.setup()
        while self.max_trips is None or self.stats["trips"] < self.max_trips:
            if not self.eligible():
                time.sleep(self.idle_wait)
                continue
            try:
                if self.trip() == "stop":
                    break
            except GaveUp as err:
                self.log(f"server unreachable: {err}")
                time.sleep(self.api.backoff.cap)
        return self.stats
