"""A run (algorithm, schedule, compression, privacy) and the experiment that holds its runs with
the shared settings (data, model, population, trainer, evaluation, stop)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from asyncfl.algorithms.defs.registry import config_union, definition, definitions, privacy_denominator, valid_names
from asyncfl.config.base import ConfigError, Strict
from asyncfl.config.data import DataConfig
from asyncfl.config.model import ModelConfig
from asyncfl.config.population import PopulationConfig
from asyncfl.config.privacy import PrivacyConfig
from asyncfl.config.robustness import RobustnessConfig
from asyncfl.config.scheduler import SchedulerConfig
from asyncfl.config.secure_aggregation import SecureAggregationConfig, check_run
from asyncfl.config.server import NormGuardConfig, ServerConfig
from asyncfl.config.study import StudyConfig
from asyncfl.config.training import TrainerConfig
from asyncfl.config.transport import CompressionConfig

# The `algorithm:` section: one config class per registered algorithm, told apart by `name`.
AlgorithmConfig = config_union()


class RunSpec(Strict):
    name: str = Field(min_length=1)
    algorithm: AlgorithmConfig
    scheduler: SchedulerConfig = SchedulerConfig()
    compression: CompressionConfig | None = None
    privacy: PrivacyConfig | None = None
    norm_guard: NormGuardConfig | None = Field(
        default=None, description="simulation: the server's adaptive norm defence (server.norm_guard); default off"
    )
    secure_aggregation: SecureAggregationConfig | None = Field(
        default=None, description="the server only sees sums of updates (SecAgg+ in sync rounds, a TSA for FedBuff)"
    )

    @field_validator("algorithm", mode="before")
    @classmethod
    def _known(cls, v):
        """Name the valid algorithms (pydantic's own message lists tags without saying what they are)."""
        name = v.get("name") if isinstance(v, dict) else None
        if isinstance(v, dict) and not (isinstance(name, str) and name in definitions()):
            problem = f"unknown algorithm {name!r}" if "name" in v else "name the algorithm (algorithm.name)"
            raise PydanticCustomError(
                "unknown_algorithm", "{problem}; valid: {valid}", {"problem": problem, "valid": valid_names()}
            )
        return v

    @model_validator(mode="after")
    def _mode(self):
        a = self.algorithm
        algorithm = definition(a.name)
        valid = algorithm.modes
        if self.scheduler.mode is None:
            self.scheduler.mode = valid[0]
        elif self.scheduler.mode not in valid:
            raise ValueError(
                f"scheduler.mode {self.scheduler.mode!r} is not valid for {a.name}; use {' or '.join(valid)}"
            )
        if self.scheduler.mode == "async" and (self.scheduler.over_selection or self.scheduler.round_timeout):
            raise ValueError("over_selection and round_timeout apply to sync mode only")
        if self.scheduler.straggler == "partial" and self.scheduler.round_timeout is None:
            raise ValueError("straggler 'partial' needs a round_timeout")
        algorithm.validate(a, self.scheduler)
        if self.compression is not None and not algorithm.compression:
            raise ValueError(f"compression is not supported for algorithm {a.name!r}")
        return self

    @model_validator(mode="after")
    def _privacy(self):
        p, a = self.privacy, self.algorithm
        if p is None:
            return self
        if not definition(a.name).private:
            private = [name for name, d in definitions().items() if d.private]
            raise ValueError(
                f"privacy is not supported for algorithm {a.name!r} (its aggregate's sensitivity is not "
                f"bounded by clip_norm); use one of {', '.join(private)} "
                "(fedbuff with buffer_size 1 for per-update noise)"
            )
        if getattr(a, "aggregation", "mean") != "mean":
            raise ValueError(f"algorithm.aggregation {a.aggregation!r} is not covered by privacy: only 'mean'")
        if a.clip_norm is not None:
            raise ValueError("algorithm.clip_norm: with privacy, set privacy.clip_norm only")
        definition(a.name).validate_privacy(a)
        if p.adaptive is not None and p.noise_multiplier > 0:
            sb = p.adaptive.count_noise_std
            sb = privacy_denominator(self) / 20 if sb is None else sb
            if not 2 * sb > p.noise_multiplier:
                raise ValueError(
                    f"privacy.adaptive.count_noise_std: 2 x {sb:g} must exceed privacy.noise_multiplier "
                    f"{p.noise_multiplier:g} (the count query shares the budget); raise it"
                )
        return self

    @model_validator(mode="after")
    def _secure_aggregation(self):
        if self.secure_aggregation is not None:
            check_run(self)
        return self


class EvalConfig(Strict):
    every_seconds: float | None = Field(default=10.0, gt=0, description="virtual seconds between evaluations")
    metrics: list[Annotated[str, Field(pattern=r"^(perplexity|[\w.]+:[\w.]+)$")]] = Field(
        default=[],
        description="more columns per evaluation: perplexity, or package.module:function called as "
        "f(logits, y) on the test set, returning a float or a {name: float} dict",
    )
    every_versions: int | None = Field(default=None, gt=0, description="also evaluate every N server steps")
    personalize: bool = Field(
        default=False, description="also report accuracy after one local step per client (always on for perfedavg)"
    )

    @model_validator(mode="after")
    def _some(self):
        if self.every_seconds is None and self.every_versions is None:
            raise ValueError("set every_seconds or every_versions")
        return self


class TargetConfig(Strict):
    """The goal time/trips/bytes to target are measured against, on any reported metric."""

    metric: str = Field(
        default="test_accuracy", description="test_accuracy, test_loss, perplexity, or a column of eval.metrics"
    )
    mode: Literal["max", "min"] = Field(default="max", description="max: reach at least value; min: at most")
    value: float


class StopConfig(Strict):
    max_time: float = Field(default=3600.0, gt=0, description="virtual seconds")
    max_trips: int | None = Field(default=None, gt=0)
    at_target: bool = Field(default=False, description="stop once the target accuracy is reached")


class ExperimentConfig(Strict):
    name: str = "experiment"
    seed: int = Field(default=0, ge=0)
    target_accuracy: float = Field(default=0.9, gt=0, le=1)
    target: TargetConfig | None = Field(
        default=None, description="a target on another metric; replaces target_accuracy"
    )
    executor: Literal["sequential", "batched", "ray"] = "sequential"
    executor_memory_mb: float = Field(default=512.0, gt=0, description="batched executor: memory per pass")
    ray_actors: int = Field(
        default=2, ge=1, description="ray executor: actors that train jobs, each a batched executor"
    )
    ray_address: str | None = Field(
        default=None,
        description="ray executor, study / robustness backend ray: the cluster to join ('auto', 'HOST:PORT'); "
        "None starts Ray locally",
    )
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    population: PopulationConfig = PopulationConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    stop: StopConfig = StopConfig()
    runs: list[RunSpec] = Field(min_length=1)
    server: ServerConfig = ServerConfig()
    study: StudyConfig | None = Field(
        default=None, description="compare runs a study (asyncfl.study) instead of the runs side by side"
    )
    robustness: RobustnessConfig | None = Field(
        default=None,
        description="compare runs an attack x defence matrix (asyncfl.robustness) instead of the runs side by side",
    )

    @model_validator(mode="after")
    def _target_reported(self):
        t, names = self.target, self.eval.metrics
        if t is None or t.metric in ("test_accuracy", "test_loss"):
            return self
        if t.metric == "perplexity" and "perplexity" not in names:
            raise ValueError("target.metric perplexity needs it in eval.metrics: [perplexity]")
        if t.metric != "perplexity" and not any(":" in n for n in names):
            raise ValueError(
                f"target.metric {t.metric!r} is not reported: add the function that computes it to eval.metrics"
            )
        return self

    @model_validator(mode="after")
    def _unique_names(self):
        names = [r.name for r in self.runs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"run names must be unique, repeated: {sorted(dup)}")
        if self.study is not None:
            for m in self.study.methods:
                if m.name not in names:
                    raise ValueError(f"study.methods: {m.name!r} is not a run; runs: {names}")
        if self.robustness is not None:
            if self.study is not None:
                raise ValueError("give study or robustness, not both")
            for d in self.robustness.defences:
                for n in d.runs or []:
                    if n not in names:
                        raise ValueError(f"robustness.defences.{d.name}.runs: {n!r} is not a run; runs: {names}")
        return self

    @model_validator(mode="after")
    def _ray_once(self):
        """Runs that are Ray tasks hold one CPU each: actors of their own could wait for a CPU forever."""
        runs_on = self.study or self.robustness
        if self.executor == "ray" and runs_on is not None and runs_on.backend == "ray":
            which = "study" if self.study is not None else "robustness"
            raise ValueError(
                f"executor ray within {which}.backend ray: each run is already a Ray task; "
                "use executor batched (or the local backend)"
            )
        return self

    def run(self, name: str | None) -> RunSpec:
        if name is None:
            return self.runs[0]
        for r in self.runs:
            if r.name == name:
                return r
        raise ConfigError(f"run {name!r} not in this config; runs: {[r.name for r in self.runs]}")
