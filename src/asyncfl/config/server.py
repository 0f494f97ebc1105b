"""Network server settings."""

from __future__ import annotations

from pydantic import Field

from asyncfl.config.base import Strict


class ServerConfig(Strict):
    """Network server settings (`asyncfl serve`); the simulator ignores them."""

    task: str | None = Field(default=None, description="task id tokens are bound to; default: the run's name")
    lease_timeout: float = Field(default=60.0, gt=0, description="seconds a client may hold a slot")
    retry_after: float = Field(default=2.0, gt=0, description="seconds a client waits when not needed")
    max_body_bytes: int | None = Field(
        default=None, gt=0, description="largest upload accepted (413 above); default: the task's largest frame"
    )
    max_update_norm: float | None = Field(default=None, gt=0, description="L2 bound on an update (422 above)")
    rate_per_s: float = Field(default=20.0, gt=0, description="requests per second per client (token bucket)")
    rate_burst: float = Field(default=40.0, ge=1, description="bucket size")
    eval_every_s: float = Field(default=2.0, gt=0, description="wall seconds between evaluations")
    keep_versions: int = Field(default=8, ge=1, description="past model versions kept besides leased ones")
    # what one connection may hold: slow senders are dropped, connections are capped
    header_timeout: float = Field(default=10.0, gt=0, description="seconds to send a request's headers (then closed)")
    body_timeout: float = Field(default=30.0, gt=0, description="seconds to send a request's body (408 after)")
    keep_alive_timeout: float = Field(default=5.0, gt=0, description="seconds an idle connection stays open")
    max_connections: int = Field(default=256, ge=1, description="connections open at once (503 above)")
