"""What the server's parts share: one store, one state lock (every in-memory change happens
under it), the two stateful roles, and the counters /status reports."""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

from asyncfl.server.aggregation import AggregationRole
from asyncfl.server.coordinator import Coordinator
from asyncfl.server.store import Store

# bytes over the wire: update bodies read (any outcome), codec payloads of the updates that passed
# validation (what the upload codec produced; frame header excluded), model frames served
TRAFFIC = {"upload_body_bytes": 0, "upload_payload_bytes": 0, "uploads_decoded": 0, "download_bytes": 0, "downloads": 0}


@dataclass
class Counters:
    """Rejections by reason and traffic are durable (committed with each group); upload
    latencies are this process's recent ones."""

    rejected: collections.Counter[str] = field(default_factory=collections.Counter)
    traffic: dict[str, int] = field(default_factory=lambda: dict(TRAFFIC))
    latency: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=2000))

    def restore(self, store: Store) -> None:
        self.rejected = collections.Counter(store.get_meta("rejected", {}))
        self.traffic = TRAFFIC | store.get_meta("traffic", {})


@dataclass
class Shared:
    store: Store
    lock: threading.RLock
    aggregation: AggregationRole
    coordinator: Coordinator
    counters: Counters = field(default_factory=Counters)
