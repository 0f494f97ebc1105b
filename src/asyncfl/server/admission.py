"""A process-wide budget of check-ins per second (`server.checkin_rate_per_s`): above it, a
check-in is answered 429 with Retry-After before authentication, routing or its body, on the
same keep-alive connection.

Past its capacity a server answers every request late, and the ones it answers in time are
luck. With a budget set below the measured capacity, the check-ins within it keep their
latency and the rest learn at once to come back later. Check-ins only: they cost a device
nothing to repeat, while an upload carries finished training and is never shed here (slots
already bound uploads). Single-threaded on the event loop, so the bucket needs no lock."""

from __future__ import annotations

import json
import logging
import time

log = logging.getLogger("asyncfl.server")
CHECKIN_PATH = "/v1/checkin"
REPORT_EVERY_S = 10.0


class CheckinAdmission:
    """ASGI middleware: a token bucket of `rate_per_s` check-ins, bursts up to a tenth of a
    second's worth (at least one); a shed check-in's Retry-After is `retry_after_s`, rounded up
    to whole seconds as HTTP wants."""

    def __init__(self, app, rate_per_s: float, retry_after_s: float):
        self.app, self.rate = app, rate_per_s
        self.burst = max(1.0, rate_per_s / 10)
        self.level, self.last = self.burst, time.monotonic()
        self.shed, self._reported, self._reported_at = 0, 0, self.last
        retry = str(max(1, int(-(-retry_after_s // 1))))
        self._body = json.dumps(
            {
                "error": "overloaded",
                "detail": f"this server answers at most {rate_per_s:g} check-ins/s; retry in {retry} s",
                "retry_after": float(retry),
            }
        ).encode()
        self._start = {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(self._body)).encode()),
                (b"retry-after", retry.encode()),
            ],
        }

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == CHECKIN_PATH and not self._admit():
            await send(self._start)
            await send({"type": "http.response.body", "body": self._body})
            return
        await self.app(scope, receive, send)

    def _admit(self) -> bool:
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.last) * self.rate)
        self.last = now
        if self.level >= 1.0:
            self.level -= 1.0
            return True
        self.shed += 1
        if now - self._reported_at >= REPORT_EVERY_S:  # a line per period, not per refusal
            log.warning(
                "shed %d check-ins in the last %.0f s (over checkin_rate_per_s %g)",
                self.shed - self._reported,
                now - self._reported_at,
                self.rate,
            )
            self._reported, self._reported_at = self.shed, now
        return False


def with_admission(app, rate_per_s: float | None, retry_after_s: float):
    """`app` behind a check-in budget, or as it is when there is none."""
    return app if rate_per_s is None else CheckinAdmission(app, rate_per_s, retry_after_s)
