"""A selector seen from outside: /status (JSON) and /metrics (Prometheus text), per task."""

from __future__ import annotations

import collections
import json
import time
from typing import TYPE_CHECKING

from asyncfl.server.observability import metric_lines, upload_seconds

if TYPE_CHECKING:
    from asyncfl.cluster.selector import Selector


PRIVACY_METRICS = (  # as the aggregator reported them at its newest step
    ("privacy_epsilon", "gauge", "Epsilon spent at the task's delta (NaN without noise).", "epsilon"),
    ("privacy_steps_total", "counter", "Noisy server steps (DP aggregates).", "privacy_steps"),
    ("privacy_clip_norm", "gauge", "Current clip norm C.", "clip_norm"),
)


def status_of(selector: Selector, tasks: set[str] | None = None) -> dict:
    """/status of one selector: what it knows of each task (all, or those in `tasks`) and what
    it did for it."""
    with selector.lock:
        views = {name: v for name, v in selector.views.items() if tasks is None or name in tasks}
        known = collections.Counter(task for task, _ in selector.leases)
        rejected = collections.defaultdict(dict)
        for (task, code), n in selector.rejected.items():
            rejected[task][code] = n
        return {
            "selector": selector.id,
            "uptime_s": round(time.time() - selector.started, 3),
            "group_commits": selector.commits.commits,
            "tasks": {
                name: {
                    "version": v.version,
                    "state": v.state,
                    "issued": v.issued,
                    "free_slots": v.free,
                    "leases_active": known[name],
                    "counts": dict(v.counts),
                    "rejected": rejected.get(name, {}),
                    # the aggregator's status as of its newest step: buffer, privacy
                    "aggregator": None if v.report is None else json.loads(v.report),
                }
                for name, v in sorted(views.items())
            },
            "rejected_unauthenticated": rejected.get("", {}),
        }


def metrics_of(selector: Selector, tasks: set[str] | None = None) -> str:
    """Prometheus text of `status_of`, labelled by task."""
    s = status_of(selector, tasks)
    items = s["tasks"].items()
    out: list[str] = []

    def per_task(name: str, kind: str, help_: str, value) -> None:
        out.extend(metric_lines(name, kind, help_, [({"task": t}, value(v)) for t, v in items]))

    def counted(name: str, help_: str, label: str, prefix: str) -> None:
        samples = [
            ({"task": t, label: k.removeprefix(prefix)}, n)
            for t, v in items
            for k, n in sorted(v["counts"].items())
            if k.startswith(prefix)
        ]
        out.extend(metric_lines(name, "counter", help_, samples))

    per_task("model_version", "gauge", "Newest model version this selector knows.", lambda v: v["version"])
    per_task("slots_free", "gauge", "Free slots granted to this selector.", lambda v: v["free_slots"])
    per_task("leases_active", "gauge", "Active leases this selector knows of.", lambda v: v["leases_active"])
    per_task("trips_issued", "counter", "Leases issued for the task by every selector.", lambda v: v["issued"])
    counted("checkins_total", "Check-ins answered by this selector, by answer.", "answer", "checkin_")
    counted("updates_total", "Uploads logged by this selector, by verdict.", "verdict", "uploads_")
    rejected = [({"task": t, "reason": k}, n) for t, v in items for k, n in sorted(v["rejected"].items())]
    rejected += [({"task": "", "reason": k}, n) for k, n in sorted(s["rejected_unauthenticated"].items())]
    out.extend(metric_lines("rejected_total", "counter", "Requests rejected, by reason.", rejected))
    per_task("sent_bytes_total", "counter", "Model frame bytes served.", lambda v: v["counts"].get("download_bytes", 0))
    per_task(
        "received_bytes_total",
        "counter",
        "Update body bytes received.",
        lambda v: v["counts"].get("upload_body_bytes", 0),
    )
    private = [(t, v["aggregator"]["privacy"]) for t, v in items if (v["aggregator"] or {}).get("privacy")]
    for name, kind, help_, key in PRIVACY_METRICS if private else ():
        out.extend(metric_lines(name, kind, help_, [({"task": t}, p[key]) for t, p in private]))
    out.extend(metric_lines("group_commits_total", "counter", "Upload group commits.", [({}, s["group_commits"])]))
    out.extend(upload_seconds(list(selector.commits.latency)))
    return "\n".join(out) + "\n"
