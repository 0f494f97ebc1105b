"""Counters for /status and Prometheus text for /metrics, computed from the roles' state."""

from __future__ import annotations

import math


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "NaN"
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def metric_lines(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> list[str]:
    """One metric family in Prometheus text: HELP, TYPE, then a line per (labels, value)."""
    out = [f"# HELP asyncfl_{name} {help_}", f"# TYPE asyncfl_{name} {kind}"]
    for labels, value in samples:
        lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
        val = _num(value)
        out.append(f"asyncfl_{name}{{{lab}}} {val}" if lab else f"asyncfl_{name} {val}")
    return out


def prometheus(status: dict, upload_latency: list[float]) -> str:
    """Prometheus text exposition (version 0.0.4) of a /status snapshot."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        out.extend(metric_lines(name, kind, help_, samples))

    metric("model_version", "gauge", "Server model version (server steps).", [({}, status["version"])])
    metric("buffer_fill", "gauge", "Updates in the aggregation buffer.", [({}, status["buffer"]["fill"])])
    metric("leases_active", "gauge", "Clients holding a lease.", [({}, status["leases"]["active"])])
    metric("slots_open", "gauge", "Slots open for check-in.", [({}, status["leases"]["open_slots"])])
    metric(
        "concurrency_limit", "gauge", "Configured concurrency (async) or cohort (sync).", [({}, status["concurrency"])]
    )
    metric(
        "leases_total",
        "counter",
        "Leases by outcome.",
        [({"outcome": k}, v) for k, v in sorted(status["leases"]["ended"].items())]
        + [({"outcome": "issued"}, status["leases"]["issued"])],
    )
    metric(
        "updates_total",
        "counter",
        "Updates folded by verdict.",
        [({"verdict": k}, v) for k, v in sorted(status["updates"].items())],
    )
    metric(
        "rejected_total",
        "counter",
        "Requests rejected, by reason.",
        [({"reason": k}, v) for k, v in sorted(status["rejected"].items())],
    )
    traffic = (status.get("compression") or {}).get("bytes")
    if traffic:
        metric(
            "received_bytes_total",
            "counter",
            "Update bytes received: whole bodies, and the codec payloads of validated updates.",
            [({"part": "body"}, traffic["upload_body_bytes"]), ({"part": "payload"}, traffic["upload_payload_bytes"])],
        )
        metric(
            "updates_decoded_total",
            "counter",
            "Updates whose payload was decoded and validated.",
            [({"codec": status["compression"]["upload_codec"]}, traffic["uploads_decoded"])],
        )
        metric("sent_bytes_total", "counter", "Model frame bytes served.", [({}, traffic["download_bytes"])])
    privacy = status.get("privacy")
    if privacy:
        metric(
            "privacy_epsilon",
            "gauge",
            f"Epsilon spent at delta={privacy['delta']:g} (NaN without noise).",
            [({}, privacy["epsilon"])],
        )
        metric(
            "privacy_steps_total", "counter", "Noisy server steps (DP aggregates).", [({}, privacy["privacy_steps"])]
        )
        metric("privacy_clip_norm", "gauge", "Current clip norm C.", [({}, privacy["clip_norm"])])
    rounds = status.get("secure_aggregation") or {}
    if "completed_rounds" in rounds:  # sync SecAgg rounds
        metric(
            "secagg_rounds_total",
            "counter",
            "Secure aggregation rounds: completed, and failed by the phase that failed.",
            [({"outcome": "completed"}, rounds["completed_rounds"])]
            + [({"outcome": "failed", "phase": k}, v) for k, v in sorted(rounds["failed_rounds"].items())],
        )
    ev = status.get("last_eval") or {}
    metric("test_accuracy", "gauge", "Test accuracy at the last evaluation.", [({}, ev.get("accuracy", math.nan))])
    metric("test_loss", "gauge", "Test loss at the last evaluation.", [({}, ev.get("loss", math.nan))])
    out.extend(upload_seconds(upload_latency))
    return "\n".join(out) + "\n"


def upload_seconds(upload_latency: list[float]) -> list[str]:
    """The upload handling time summary (quantiles over recent uploads)."""
    lat = sorted(upload_latency)
    qs = [({"quantile": q}, lat[min(len(lat) - 1, int(q * len(lat)))] if lat else math.nan) for q in (0.5, 0.9, 0.99)]
    out = [
        "# HELP asyncfl_upload_seconds Upload handling time over recent uploads.",
        "# TYPE asyncfl_upload_seconds summary",
    ]
    for labels, value in qs:
        out.append(f'asyncfl_upload_seconds{{quantile="{labels["quantile"]}"}} {_num(value)}')
    out.append(f"asyncfl_upload_seconds_sum {_num(sum(lat))}")
    out.append(f"asyncfl_upload_seconds_count {len(lat)}")
    return out
