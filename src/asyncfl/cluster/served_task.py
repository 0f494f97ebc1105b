"""One task as a selector serves it: built once per selector from the task's row (its resolved
experiment config and run), with the single process's own pieces, so an upload is judged by the
same code whichever server receives it: AggregationRole.check (frame, tensors, values, norm
bound), ReportBounds, the norm guard, the body limit, the task description and model frames.
With secure aggregation by the TSA: the masked frame reader, and the TSA link that vets each
upload's sealed seed (no norm guard: norms are masked)."""

from __future__ import annotations

import threading

from asyncfl.algorithms.defs.registry import definition
from asyncfl.build import build_norm_guard
from asyncfl.cluster.partials import merges
from asyncfl.cluster.tasks import build_objects, task_config
from asyncfl.compression import parse_codec
from asyncfl.server.aggregation import AggregationRole, AggregationSettings
from asyncfl.server.errors import ApiError
from asyncfl.server.limits import body_limit
from asyncfl.server.service import describe_task, model_frame_bytes, report_bounds
from asyncfl.server.store import tensor_load

FRAMES_KEPT = 4  # model frames cached per task: the versions leases start from are the last few


class ServedTask:
    def __init__(self, name: str, tree: dict, run: str):
        self.name = name
        objects = build_objects(task_config(tree), run)
        self.cfg, self.spec, self.settings = objects.cfg, objects.spec, objects.settings
        self.data, self.model, self.aggregator = objects.data, objects.model, objects.aggregator
        self.tsa = objects.tsa
        self.tsa_link = None if self.tsa is None else self.tsa.link()
        comp = self.spec.compression
        upload = parse_codec(comp.upload) if comp is not None else None
        download = parse_codec(comp.download) if comp is not None else None
        self.download_codec = download if download is not None and not download.lossless else None
        self.merges = merges(self.aggregator)
        w0 = self.model.initial_weights()
        self.algorithm = definition(self.spec.algorithm.name)
        # this selector's judge of uploads; its model is unused (the aggregator holds the model)
        self.aggregation = AggregationRole(
            self.aggregator,
            w0,
            AggregationSettings(
                self.model.names,
                self.model.shapes,
                self.settings.max_update_norm,
                self.settings.keep_versions,
                upload,
                comp.upload if comp is not None else None,
                self.algorithm.upload_fields,
                None if self.tsa is None else self.tsa.frames,
            ),
            build_norm_guard(self.settings.norm_guard, w0) if self.tsa is None else None,
        )
        self.max_body_bytes = body_limit(self.settings, self.aggregation)
        self.bounds = report_bounds(self.cfg, self.spec, self.settings, self.data, self.model)
        self.info = describe_task(name, self)
        self.lock = threading.Lock()  # the norm guard and the frame cache
        self._frames: dict[int, bytes] = {}

    @property
    def max_staleness(self) -> int | None:
        return self.aggregator.max_staleness

    @property
    def max_trips(self) -> int | None:
        return self.cfg.stop.max_trips

    def cached_frame(self, version: int) -> bytes | None:
        with self.lock:
            return self._frames.get(version)

    def frame(self, version: int, load) -> bytes:
        """A version's model frame, built once per selector; `load(version)` reads its weights
        (the versions row's body, or None when it is gone)."""
        found = self.cached_frame(version)
        if found is not None:
            return found
        body = load(version)
        if body is None:
            raise ApiError(404, "version_unavailable", f"model version {version} is not available")
        w = tensor_load(bytes(body))
        frame = model_frame_bytes(self.cfg.seed, version, w, self.model, self.download_codec, {})
        with self.lock:
            if len(self._frames) >= FRAMES_KEPT:
                self._frames.pop(min(self._frames))
            self._frames[version] = frame
        return frame

    def vet(self, checked) -> ApiError | None:
        """A masked upload's sealed seed checked by the TSA (`TsaLink.vet`: the 422 refusal, or
        503 raised while the TSA cannot be asked); None for a plain upload."""
        return None if checked.masked is None else self.tsa_link.vet(checked.masked)

    def screen(self, norm: float) -> None:
        """The norm guard's verdict (422 norm_rejected), as the single process gives it; each
        selector's guard learns from the updates it accepted."""
        with self.lock:
            self.aggregation.screen(norm)

    def accepted(self, norm: float) -> None:
        if self.aggregation.guard is not None:
            with self.lock:
                self.aggregation.guard.accept(norm)
