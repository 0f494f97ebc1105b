"""The server seen from outside: /status (one JSON snapshot of every part), /metrics (its
Prometheus text) and /history (the evaluations)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from asyncfl.server import observability

if TYPE_CHECKING:
    from asyncfl.server.service import FLServer


class StatusView:
    def __init__(self, server: FLServer):
        self.server = server

    def status(self) -> dict:
        s = self.server
        sh = s.shared
        with sh.lock:
            agg, co = sh.aggregation, sh.coordinator
            answer = {
                "task": s.task,
                "run": s.spec.name,
                "algorithm": s.spec.algorithm.name,
                "mode": s.policy.mode,
                "version": s.commit.durable_version,
                **agg.aggregator.status(),  # buffer and privacy
                "concurrency": s.spec.scheduler.concurrency,
                "leases": {
                    "active": len(co.leases),
                    "open_slots": co.open_slots,
                    "issued": co.issued,
                    "ended": dict(co.ended),
                },
                "updates": dict(agg.counts),
                "norm_guard": agg.guard.status() if agg.guard is not None else None,
                "rejected": dict(sh.counters.rejected),  # 429s included: durable like the rest
                "last_eval": s.evaluation.evals[-1] if s.evaluation.evals else None,
                "target_accuracy": s.cfg.target_accuracy,
                "reached_target": s.evaluation.reached_target,
                "done": s.done,
                "uptime_s": round(time.time() - s.started, 3),
            }
            answer["compression"] = self._compression_status()
            return answer | s.policy.status()

    def _compression_status(self) -> dict:
        s = self.server
        t = s.shared.counters.traffic
        return {
            "upload_codec": s.shared.aggregation.expected_codec or "none",
            "download_codec": s.download_codec.spec if s.download_codec is not None else "none",
            "error_feedback": bool(s.spec.compression and s.spec.compression.error_feedback),
            "bytes": dict(t),
            "upload_payload_bytes_per_update": (
                t["upload_payload_bytes"] / t["uploads_decoded"] if t["uploads_decoded"] else None
            ),
        }

    def metrics_text(self) -> str:
        return observability.prometheus(self.status(), list(self.server.shared.counters.latency))
