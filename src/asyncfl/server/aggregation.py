"""The aggregator role: validates an update, folds it in with the configured algorithm (the
very aggregator object the simulator uses), steps and versions the model, and writes its part
of the durable state. It knows nothing of HTTP or leases."""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from asyncfl import wire
from asyncfl.algorithms.aggregators import Aggregator
from asyncfl.algorithms.norm_guard import NormGuard
from asyncfl.algorithms.types import ClientUpdate, ServerState, Verdict
from asyncfl.compression import Codec, Raw
from asyncfl.server.errors import ApiError
from asyncfl.server.store import Store, tensor_bytes, tensor_load

log = logging.getLogger("asyncfl.server")


@dataclass
class Checked:
    """An upload that passed every check that does not depend on run state."""

    header: wire.UpdateHeader
    delta: torch.Tensor
    norm: float
    payload_bytes: int = 0  # the frame's payload as received (encoded bytes with compression)
    extras: dict[str, torch.Tensor] | None = None  # the algorithm's upload fields, checked like the delta
    masked: Any = None  # a masked upload for the TSA (tsa_buffer), whose delta the server cannot read


@dataclass(frozen=True)
class AggregationSettings:
    """What the role checks uploads against and keeps: the model's tensor names and shapes, the
    bound on an update's L2 norm (None: none), how many recent versions stay downloadable, and
    the run's upload codec (None or lossless raw: plain frames), the only one uploads may use;
    `upload_spec` is how the config spells it (accepted besides the canonical spec);
    `upload_fields` the tensor sets an upload carries besides its delta (the algorithm's)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    max_norm: float | None
    keep_versions: int
    upload_codec: Codec | None = None
    upload_spec: str | None = None
    upload_fields: tuple[str, ...] = ()
    masked: Any = None  # tsa_buffer.MaskedFrames: uploads are masked frames for the TSA


@dataclass
class _Dirty:
    state: bool = False
    guard: bool = False
    new_versions: list[tuple[int, float, list[int]]] = field(default_factory=list)
    discarded: list[int] = field(default_factory=list)  # buffered updates a refused step threw away


def _cloned(tree):
    """A deep copy of a state_dict: tensors cloned, so later in-place changes do not reach it."""
    if isinstance(tree, torch.Tensor):
        return tree.clone()
    if isinstance(tree, dict):
        return {k: _cloned(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(_cloned(v) for v in tree)
    return tree


def all_finite(tree) -> bool:
    if isinstance(tree, torch.Tensor):
        return bool(torch.isfinite(tree).all()) if tree.is_floating_point() else True
    if isinstance(tree, dict):
        return all(all_finite(v) for v in tree.values())
    if isinstance(tree, list | tuple):
        return all(all_finite(v) for v in tree)
    return not isinstance(tree, float) or math.isfinite(tree)


class AggregationRole:
    """`guard` (None: none) screens each update's norm before it folds in. Every server step is
    checked: a step that would leave the model or the aggregator's state (server optimizer
    moments, control variates) non-finite is refused, and the aggregator goes back to its state
    right after the last step, so the model, its version and the optimizer state stay as they
    were and the buffered updates that caused it are discarded."""

    def __init__(
        self, aggregator: Aggregator, w0: torch.Tensor, settings: AggregationSettings, guard: NormGuard | None = None
    ):
        self.aggregator = aggregator
        self.guard = guard
        self.names, self.shapes = list(settings.names), [tuple(s) for s in settings.shapes]
        self.max_norm = settings.max_norm
        self.keep_versions = settings.keep_versions
        self.upload_fields = tuple(settings.upload_fields)
        # an upload's tensors: the delta's, then each upload field's, all shaped like the model's
        self.expected = list(zip(self.names, self.shapes)) + [
            (name, shape)
            for f in self.upload_fields
            for name, shape in zip(wire.field_names(f, self.names), self.shapes)
        ]
        self.state = ServerState(w=w0.clone(), version=0)
        self.models: dict[int, torch.Tensor] = {0: self.state.w}
        # what clients download with each kept version besides the model (the aggregator's
        # `downloads`: SCAFFOLD's c as of that version); after a restart only the current one's
        self.downloads: dict[int, dict[str, torch.Tensor]] = {0: aggregator.downloads(self.state.w)}
        self.pending_seqs: list[int] = []  # accepted updates folded into the buffer, not yet in a version
        self.counts = {v.value: 0 for v in Verdict}
        self._dirty = _Dirty(state=True, guard=True, new_versions=[(0, time.time(), [])])
        # where a refused step returns to, and the buffered updates that state holds
        self._after_step, self._after_step_seqs = _cloned(aggregator.state_dict()), []
        codec = settings.upload_codec
        self.upload_codec = None if codec is None or isinstance(codec, Raw) else codec
        self.codecs, self.expected_codec = None, None  # None: wire.CODECS, i.e. raw frames only
        self.masked = settings.masked
        if self.masked is not None:
            self.expected_codec = self.masked.spec
        if self.upload_codec is not None:
            decoder = wire.compressed_decoder(self.upload_codec, self._check_specs)
            self.expected_codec = settings.upload_spec or self.upload_codec.spec
            self.codecs = {self.upload_codec.spec: decoder, self.expected_codec: decoder}

    # ---- validation (pure) ------------------------------------------------------------
    def check(self, body: bytes) -> Checked:
        if self.masked is not None:
            return self.masked.check(body, self._check_specs)
        try:
            frame = wire.decode(body, wire.UpdateHeader, self.codecs, self.expected_codec)
        except wire.WireError as err:
            raise ApiError(err.status, err.code, str(err)) from None
        self._check_specs(frame.header.tensors)
        arrays, fields = wire.split_fields(frame.arrays, self.names, self.upload_fields)
        delta = wire.join_flat(arrays)
        norm = self._check_values(delta, "update")
        for name, t in fields.items():  # checked like the delta: finite, within the norm bound
            self._check_values(t, f"update's {name}")
        return Checked(frame.header, delta, norm, wire.payload_length(body), fields or None)

    def _check_values(self, t: torch.Tensor, what: str) -> float:
        """The L2 norm of `t`; 422 for NaN or Inf values or a norm over the bound."""
        norm = float(torch.linalg.vector_norm(t))  # finite unless a value is NaN/Inf (or overflows)
        if not math.isfinite(norm):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ApiError(422, "non_finite", f"{what} contains {bad} NaN or Inf values")
            norm = float(torch.linalg.vector_norm(t.double()))
        if self.max_norm is not None and norm > self.max_norm:
            raise ApiError(422, "norm_too_large", f"{what} L2 norm {norm:.4g} exceeds the bound {self.max_norm:g}")
        return norm

    def _check_specs(self, specs: list[wire.TensorSpec]) -> None:
        """The header's tensors must be the model's (count, float32, names, shapes), followed by
        each upload field's, named `FIELD:NAME`."""
        if len(specs) != len(self.expected):
            expected = f"the model has {len(self.shapes)}"
            if self.upload_fields:
                expected = (
                    f"expected {len(self.expected)} (the model's {len(self.shapes)} for the delta and for "
                    f"each of {', '.join(self.upload_fields)})"
                )
            raise ApiError(422, "bad_tensor_count", f"update has {len(specs)} tensors, {expected}")
        for i, (spec, (name, shape)) in enumerate(zip(specs, self.expected)):
            if spec.dtype != "float32":
                raise ApiError(422, "bad_dtype", f"tensor {i} ({spec.name!r}) has dtype {spec.dtype}; expected float32")
            if spec.name != name:
                raise ApiError(422, "bad_tensor_name", f"tensor {i} is named {spec.name!r}; expected {name!r}")
            if tuple(spec.shape) != shape:
                raise ApiError(
                    422, "bad_shape", f"tensor {i} ({name!r}) has shape {list(spec.shape)}; expected {list(shape)}"
                )

    # ---- folding ----------------------------------------------------------------------
    def downloads_of(self, version: int) -> dict[str, torch.Tensor] | None:
        """What clients download with a kept version besides the model; None when it is not
        known (a restarted server knows only its current version's)."""
        found = self.downloads.get(version)
        if found is None and not self.downloads.get(self.state.version):
            return {}  # the aggregator sends nothing besides models
        return found

    def base_weights(self, version: int) -> torch.Tensor | None:
        return self.models.get(version)

    def screen(self, norm: float) -> None:
        """422 when the norm guard refuses an update of this L2 norm (under the state lock, before
        it folds in)."""
        if self.guard is None:
            return
        reason = self.guard.check(norm)
        self._dirty.guard = True  # a check counts a refusal or, while warming up, records the norm seen
        if reason is not None:
            raise ApiError(422, "norm_rejected", f"update {reason}; it was not folded in")

    def fold(self, update: ClientUpdate, seq: int | None, norm: float | None = None) -> Verdict:
        """Runtime.submit's body: the shared aggregator decides; we version and log. `seq` is
        the update log's number of the upload (None: not in the log), recorded in the version
        it ends up in; `norm` its L2 norm, which the guard records once it is taken in. Raises
        422 `step_not_finite` when the step it triggers is refused, `filter_rejected` when the
        algorithm's Byzantine filter refuses the update."""
        base_w = self.models.get(update.base_version)
        if base_w is None:  # only FedAsync reads base_w; the lease kept it unless the run state was lost
            base_w = self.state.w
        w, version = self.state.w, self.state.version
        verdict = self.aggregator.submit(self.state, update, base_w)
        if verdict == Verdict.STEPPED and not self._step_finite():
            self._refuse_step(w, version)
            raise ApiError(
                422,
                "step_not_finite",
                "the server step this update completed would have made the model non-finite; the step was "
                "refused and the buffered updates discarded, the model is unchanged",
            )
        if verdict == Verdict.DISCARDED and (reason := self.aggregator.refused()) is not None:
            self._dirty.state = True  # the filter recorded the update's coefficient
            raise ApiError(422, "filter_rejected", f"{reason}; the update was not folded in")
        self.counts[verdict.value] += 1
        if verdict != Verdict.DISCARDED:
            self._dirty.state = True
            if seq is not None:
                self.pending_seqs.append(seq)
            if self.guard is not None and norm is not None:
                self.guard.accept(norm)
                self._dirty.guard = True
        if verdict == Verdict.STEPPED:
            self._stepped()
        return verdict

    def flush(self) -> bool:
        w, version = self.state.w, self.state.version
        stepped = self.aggregator.flush(self.state)
        self._dirty.state = True
        if stepped and not self._step_finite():
            self._refuse_step(w, version)
            return False
        if stepped:
            self._stepped()
        return stepped

    def _step_finite(self) -> bool:
        return bool(torch.isfinite(self.state.w).all()) and all_finite(self.aggregator.state_dict())

    def _refuse_step(self, w: torch.Tensor, version: int) -> None:
        """Back to the model and aggregator state of the last step (or of the restart); the
        updates buffered since are logged as discarded."""
        self.state.w, self.state.version = w, version
        self.aggregator.load_state_dict(_cloned(self._after_step))
        self._dirty.state = True
        dropped = [s for s in self.pending_seqs if s not in self._after_step_seqs]
        self.pending_seqs = list(self._after_step_seqs)
        self._dirty.discarded.extend(dropped)
        self.counts[Verdict.BUFFERED.value] -= len(dropped)
        self.counts[Verdict.DISCARDED.value] += len(dropped)
        log.warning(
            "server step refused: it would have made the model non-finite; version %d kept, buffered updates %s "
            "discarded",
            version,
            dropped,
        )

    def _stepped(self) -> None:
        v = self.state.version
        self.models[v] = self.state.w
        self.downloads[v] = self.aggregator.downloads(self.state.w)
        self._dirty.new_versions.append((v, time.time(), self.pending_seqs))
        self.pending_seqs = []
        self._after_step, self._after_step_seqs = _cloned(self.aggregator.state_dict()), []

    def prune(self, needed: set[int]) -> None:
        keep = needed | {v for v in self.models if v > self.state.version - self.keep_versions}
        for v in [v for v in self.models if v not in keep]:
            del self.models[v]
            self.downloads.pop(v, None)

    # ---- durability -------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Under the state lock: everything this role changed since the last snapshot, as
        bytes, so the slow disk writes can run while other updates fold in."""
        d, self._dirty = self._dirty, _Dirty()
        return {
            "versions": [(v, t, seqs, tensor_bytes(self.models.get(v, self.state.w))) for v, t, seqs in d.new_versions],
            "kept": sorted(self.models) if d.new_versions else None,
            "state": tensor_bytes(self.aggregator.state_dict()) if d.state else None,
            "guard": self.guard.state_dict() if d.guard and self.guard is not None else None,
            "discarded": d.discarded,
            "version": self.state.version,
        }

    @staticmethod
    def persist(snap: dict, db: sqlite3.Connection, store: Store, new_files: list[str]) -> list[str]:
        """Inside the commit's transaction: tensor files first, then the rows pointing to them.
        Model versions get files of their own; the aggregator's running state alternates
        between two slots, always overwriting the one the last commit does not point to.
        Returns the files the commit makes obsolete."""
        files = store.write_files([("model", data) for *_, data in snap["versions"]])
        new_files.extend(name for name, _ in files)
        for (v, t, seqs, _), (name, crc) in zip(snap["versions"], files):
            db.execute("INSERT INTO models(version, file, crc) VALUES(?, ?, ?)", (v, name, crc))
            db.execute("INSERT INTO versions(version, created_at, updates) VALUES(?, ?, ?)", (v, t, json.dumps(seqs)))
            if seqs:
                db.executemany("UPDATE updates SET applied_version=? WHERE seq=?", [(v, s) for s in seqs])
        db.executemany("UPDATE updates SET verdict='discarded' WHERE seq=?", [(s,) for s in snap["discarded"]])
        if snap["guard"] is not None:
            Store.put_meta(db, "norm_guard", snap["guard"])
        obsolete = []
        if snap["kept"] is not None:
            marks = ",".join("?" * len(snap["kept"]))
            obsolete = [
                f for (f,) in db.execute(f"SELECT file FROM models WHERE version NOT IN ({marks})", snap["kept"])
            ]
            db.execute(f"DELETE FROM models WHERE version NOT IN ({marks})", snap["kept"])
        if snap["state"] is not None:
            current = db.execute("SELECT file FROM blobs WHERE name='aggregator'").fetchall()
            slot = "slot-b.bin" if current and current[0][0] == "slot-a.bin" else "slot-a.bin"
            name, crc = store.write_slot(slot, snap["state"])
            Store.put_meta(db, "version", snap["version"])
            db.execute("INSERT OR REPLACE INTO blobs(name, file, crc) VALUES('aggregator', ?, ?)", (name, crc))
        return obsolete

    def restore(self, store: Store) -> None:
        self.state.version = store.get_meta("version")
        self.models = {
            v: tensor_load(store.read_file(f, crc))
            for v, f, crc in store.query("SELECT version, file, crc FROM models")
        }
        self.state.w = self.models[self.state.version]
        (name, crc) = store.query("SELECT file, crc FROM blobs WHERE name='aggregator'")[0]
        self.aggregator.load_state_dict(tensor_load(store.read_file(name, crc)))
        guard = store.get_meta("norm_guard")
        if self.guard is not None and guard is not None:
            self.guard.load_state_dict(guard)
        self.downloads = {self.state.version: self.aggregator.downloads(self.state.w)}
        self.pending_seqs = [
            s
            for (s,) in store.query(
                "SELECT seq FROM updates WHERE applied_version IS NULL AND verdict IN ('buffered', 'stepped') "
                "ORDER BY seq"
            )
        ]
        # after a restart a refused step goes back to the buffer as restored
        self._after_step, self._after_step_seqs = _cloned(self.aggregator.state_dict()), list(self.pending_seqs)
        self.counts = {v.value: 0 for v in Verdict}  # after a rollback too: none may outlive their rows
        for verdict, n in store.query("SELECT verdict, count(*) FROM updates GROUP BY verdict"):
            if verdict in self.counts:
                self.counts[verdict] = n
        self._dirty = _Dirty()
        store.sweep()
