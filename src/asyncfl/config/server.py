"""Network server settings."""

from __future__ import annotations

from pydantic import Field, model_validator

from asyncfl.config.base import Strict


class NormGuardConfig(Strict):
    """The adaptive norm defence (`asyncfl.algorithms.norm_guard`): refuse an update whose L2
    norm exceeds `multiple` x the median of the last `window` accepted norms; until `warmup`
    updates are accepted, `multiple` x the median of all norms seen so far; always at most
    `multiple` x the initial model's norm (at least 1)."""

    multiple: float = Field(default=5.0, gt=1, description="refuse norms above this many times the median")
    window: int = Field(default=50, ge=1, description="accepted norms the median is taken over")
    warmup: int = Field(default=10, ge=1, description="accepted updates before the median applies")

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup > self.window:
            raise ValueError(f"warmup ({self.warmup}) must not exceed window ({self.window})")
        return self


class ServerConfig(Strict):
    """Network server settings (`asyncfl serve`); the simulator ignores them."""

    task: str | None = Field(default=None, description="task id tokens are bound to; default: the run's name")
    lease_timeout: float = Field(default=60.0, gt=0, description="seconds a client may hold a slot")
    retry_after: float = Field(default=2.0, gt=0, description="seconds a client waits when not needed")
    max_body_bytes: int | None = Field(
        default=None, gt=0, description="largest upload accepted (413 above); default: the task's largest frame"
    )
    max_update_norm: float | None = Field(default=None, gt=0, description="L2 bound on an update (422 above)")
    norm_guard: NormGuardConfig | None = Field(
        default=NormGuardConfig(), description="adaptive norm defence (422 norm_rejected); null: off"
    )
    max_examples: int | None = Field(
        default=None,
        gt=0,
        description="largest n_examples an upload may report (422 above); default: the task's largest client partition",
    )
    max_loss: float = Field(default=1e4, gt=0, description="largest loss / start_loss an upload may report")
    rate_per_s: float = Field(default=20.0, gt=0, description="requests per second per client (token bucket)")
    rate_burst: float = Field(default=40.0, ge=1, description="bucket size")
    eval_every_s: float = Field(default=2.0, gt=0, description="wall seconds between evaluations")
    keep_versions: int = Field(default=8, ge=1, description="past model versions kept besides leased ones")
    public_status: bool = Field(default=False, description="serve /status and /metrics without an operator token")
    anonymous_rate_per_s: float = Field(
        default=2.0, gt=0, description="requests per second per address without a valid token (token bucket)"
    )
    anonymous_burst: float = Field(default=20.0, ge=1, description="bucket size for requests without a valid token")
    # what one connection may hold: slow senders are dropped, connections are capped
    header_timeout: float = Field(default=10.0, gt=0, description="seconds to send a request's headers (then closed)")
    body_timeout: float = Field(default=30.0, gt=0, description="seconds to send a request's body (408 after)")
    keep_alive_timeout: float = Field(default=5.0, gt=0, description="seconds an idle connection stays open")
    max_connections: int = Field(
        default=1024,
        ge=1,
        description="connections open at once (503 above); the open-files limit is raised to fit them",
    )
    checkin_rate_per_s: float | None = Field(
        default=None,
        gt=0,
        description="check-ins per second this process answers (a selector's admission budget); above, 429 with "
        "Retry-After before any other work; set it below the measured capacity; null: only the connection cap",
    )
    # secure_aggregation 'tsa': where the trusted secure aggregator answers, and its public key
    tsa_url: str | None = Field(default=None, description="the TSA's URL (asyncfl tsa serve)")
    tsa_public_key: str | None = Field(
        default=None, description="the TSA's X25519 public key (base64) advertised to clients, who pin it"
    )
    tsa_token_file: str | None = Field(
        default=None, description="file holding the bearer token shared with the TSA; default: $ASYNCFL_TSA_TOKEN"
    )
    secagg_phase_timeout: float | None = Field(
        default=None,
        gt=0,
        description="secure aggregation: seconds each phase after key advertisement waits for clients (then "
        "the missing ones count as dropped); default: a quarter of the round timeout (or lease timeout), at least 2",
    )
