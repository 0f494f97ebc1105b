"""Studies: each method tuned on a grid at each concurrency, then run with every seed."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from asyncfl.config.base import Strict

# where the runs of a study or a robustness matrix execute, and how many at once
Backend = Annotated[
    Literal["local", "ray"],
    Field(
        description="local: processes on this machine; ray: Ray tasks (one CPU, one torch thread each) on the "
        "Ray cluster at ray_address / --ray-address (none: Ray started on this machine)"
    ),
]
Workers = Annotated[
    Annotated[int, Field(ge=1)] | None,
    Field(
        description="runs at once: local, worker processes with one torch thread each (default 1: in this "
        "process); ray, Ray tasks in flight (default: as many as the cluster has CPUs)"
    ),
]


def default_workers(backend: str, workers: int | None) -> int | None:
    """Unset workers: one (in this process) on the local backend; on Ray, the cluster decides."""
    return 1 if workers is None and backend == "local" else workers


class StudyMethod(Strict):
    """A method of a study: one of the experiment's runs, tuned on a grid at each concurrency."""

    name: str = Field(min_length=1, description="a run of runs:")
    concurrency: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, min_length=1, description="concurrencies this method runs at; default study.concurrency"
    )
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="dotted key (as for --set) -> values tried; the grid is their product"
    )
    grid_at: dict[int, dict[str, Annotated[list[Any], Field(min_length=1)]]] = Field(
        default_factory=dict,
        description="concurrency -> grid entries that replace or extend `grid` there "
        "(e.g. FedBuff's K as a share of C)",
    )
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value for all this method's runs")

    @field_validator("grid_at", mode="before")
    @classmethod
    def _merge_keys(cls, v):
        return _int_keys(v, "grid_at")

    def grid_for(self, concurrency: int) -> dict[str, list[Any]]:
        return {**self.grid, **self.grid_at.get(concurrency, {})}


def _int_keys(v, what: str):
    """YAML writes `10000:` as an int key, --set / quick: blocks `x.10000.y` as a string: fold
    both into one int key (later entries win)."""
    if not isinstance(v, dict):
        return v
    out: dict = {}
    for k, block in v.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: key {k!r} is not a concurrency") from None
        if isinstance(out.get(key), dict) and isinstance(block, dict):
            out[key] = {**out[key], **block}
        else:
            out[key] = block
    return out


class StudyRatio(Strict):
    """Report baseline / method for time, trips and bytes to target (per seed, and their spread)."""

    baseline: str = Field(min_length=1)
    method: str = Field(min_length=1)


class StudyConfig(Strict):
    """A study (`asyncfl compare` runs it; `asyncfl.study`): each method at each concurrency is
    tuned on its grid with `tune_seed`, the best point (least virtual time to target) then runs
    with every seed, and `ratios` compares methods per concurrency."""

    concurrency: list[Annotated[int, Field(gt=0)]] = Field(min_length=1)
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default=[0, 1, 2], min_length=1)
    tune_seed: int | None = Field(default=None, ge=0, description="seed of the grid runs; default seeds[0]")
    methods: list[StudyMethod] = Field(min_length=1)
    ratios: list[StudyRatio] = Field(default_factory=list)
    at_concurrency: dict[int, dict[str, Any]] = Field(
        default_factory=dict, description="concurrency -> {dotted key: value} for every run at it"
    )
    round_timeout_percentile: float | None = Field(
        default=None,
        gt=0,
        lt=100,
        description="sync runs without round_timeout get this percentile of the population's trip durations",
    )
    cap_grid_at_best: bool = Field(
        default=True,
        description="stop a grid point once it can no longer beat the best "
        "point so far (virtual time past the best time to target)",
    )
    backend: Backend = "local"
    workers: Workers = None

    @field_validator("at_concurrency", mode="before")
    @classmethod
    def _merge_keys(cls, v):
        return _int_keys(v, "at_concurrency")

    @model_validator(mode="after")
    def _consistent(self):
        self.workers = default_workers(self.backend, self.workers)
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds repeat: {self.seeds}")
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            raise ValueError(f"methods repeat: {names}")
        for r in self.ratios:
            for n in (r.baseline, r.method):
                if n not in names:
                    raise ValueError(f"ratios: {n!r} is not a study method; methods: {names}")
        used = set(self.concurrency).union(*(m.concurrency or [] for m in self.methods))
        for c in self.at_concurrency:
            if c not in used:
                raise ValueError(f"at_concurrency: no method runs at concurrency {c}; concurrencies: {sorted(used)}")
        for m in self.methods:
            for c in m.grid_at:
                if c not in self.method_concurrency(m):
                    raise ValueError(f"methods.{m.name}.grid_at: {m.name} does not run at concurrency {c}")
        return self

    def method_concurrency(self, m: StudyMethod) -> list[int]:
        return list(m.concurrency or self.concurrency)

    @property
    def grid_seed(self) -> int:
        return self.seeds[0] if self.tune_seed is None else self.tune_seed
