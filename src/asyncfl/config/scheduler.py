"""When clients train: synchronous rounds or asynchronous slots."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from asyncfl.config.base import Strict


class SchedulerConfig(Strict):
    mode: Literal["sync", "async"] | None = None
    concurrency: int = Field(default=20, gt=0, description="async: clients training; sync: cohort")
    over_selection: float = Field(default=0.0, ge=0, description="sync: extra fraction selected")
    round_timeout: float | None = Field(default=None, gt=0, description="sync: virtual seconds")
    straggler: Literal["drop", "wait", "partial"] = "drop"
