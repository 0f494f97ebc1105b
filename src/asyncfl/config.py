"""Typed experiment configuration, validated at the edge with errors that name the field.

An experiment holds the shared settings (data, model, population, trainer, evaluation, stop)
and a list of runs, each naming an algorithm and a scheduling policy. `simulate` executes one
run, `compare` all of them side by side.
"""

from __future__ import annotations

import copy
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the user, naming the offending field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dist(Strict):
    """A per-device random quantity. `scale` is the median (lognormal), the sigma of the
    underlying normal (halfnormal), the mean (exponential) or the value (constant)."""

    kind: Literal["lognormal", "halfnormal", "exponential", "constant"] = "lognormal"
    scale: float = Field(gt=0)
    sigma: float = Field(default=1.0, ge=0, description="lognormal shape")
    minimum: float = Field(default=0.0, ge=0, description="floor applied after sampling")


class Availability(Strict):
    """Diurnal eligibility: a device is eligible for `on_fraction` of every `period`, at a
    per-device random phase. on_fraction = 1 means always eligible."""

    period: float = Field(default=86400.0, gt=0)
    on_fraction: float = Field(default=1.0, gt=0, le=1)


class AttackConfig(Strict):
    """Untrusted clients: a fixed random `fraction` of devices corrupt every update they send."""

    fraction: float = Field(default=0.0, ge=0, lt=1)
    kind: Literal["scale", "sign_flip"] = "sign_flip"
    factor: float = Field(default=10.0, gt=0, description="scale: delta x factor; sign_flip: delta x -factor")


class PopulationConfig(Strict):
    devices: int = Field(default=100, gt=0)
    compute_per_example: Dist = Dist(kind="lognormal", scale=0.05, sigma=1.0)
    download_bandwidth: Dist = Dist(kind="lognormal", scale=1e6, sigma=0.5)  # bytes / s
    upload_bandwidth: Dist = Dist(kind="lognormal", scale=2.5e5, sigma=0.5)
    dropout: float = Field(default=0.0, ge=0, lt=1, description="probability a trip never reports")
    availability: Availability = Availability()
    retry_interval: float = Field(default=60.0, gt=0, description="wait when no device is eligible")
    attack: AttackConfig = AttackConfig()


class PartitionConfig(Strict):
    kind: Literal["iid", "dirichlet", "shards", "quantity_skew"] = "dirichlet"
    alpha: float = Field(default=0.5, gt=0, description="dirichlet concentration")
    classes_per_client: int = Field(default=2, gt=0, description="shards per client")
    exponent: float = Field(default=1.0, gt=0, description="quantity_skew power law")


class DataConfig(Strict):
    dataset: Literal["digits"] = "digits"
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    partition: PartitionConfig = PartitionConfig()
    num_clients: int | None = Field(
        default=None, gt=0, description="partitions; default one per device, devices reuse them modulo"
    )


class ModelConfig(Strict):
    name: Literal["logreg", "mlp", "cnn"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = [64]
    width: int = Field(default=16, gt=0, description="cnn channels")


class TrainerConfig(Strict):
    lr: float = Field(default=0.1, gt=0)
    batch_size: int = Field(default=16, gt=0)
    local_steps: int | None = Field(default=10, gt=0)
    local_epochs: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_budget(self):
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("set exactly one of local_steps and local_epochs (the other to null)")
        return self


class ServerOptConfig(Strict):
    name: Literal["sgd", "adam", "yogi", "adagrad"] = "sgd"
    lr: float = Field(default=1.0, gt=0)
    momentum: float = Field(default=0.0, ge=0, lt=1)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.99, ge=0, lt=1)
    tau: float = Field(default=1e-3, gt=0)


class StalenessConfig(Strict):
    kind: Literal["constant", "polynomial", "hinge", "inverse_sqrt"] = "inverse_sqrt"
    a: float = Field(default=0.5, gt=0)
    b: float = Field(default=4.0, ge=0)


class RoundAggregation(Strict):
    """How a round's (or buffer's) updates combine: the weighted mean, or a robust rule."""

    server_opt: ServerOptConfig = ServerOptConfig()
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"
    trim_fraction: float = Field(default=0.1, ge=0, lt=0.5, description="trimmed_mean: cut from each end")
    clip_norm: float | None = Field(default=None, gt=0, description="clip each update's L2 norm first")


class FedAvgConfig(RoundAggregation):
    name: Literal["fedavg"]


class FedProxConfig(RoundAggregation):
    name: Literal["fedprox"]
    mu: float = Field(default=0.01, ge=0, description="proximal coefficient")


class PerFedAvgConfig(RoundAggregation):
    name: Literal["perfedavg"]
    variant: Literal["fo", "hf"] = Field(default="fo", description="first order, or Hessian-free")
    meta_lr: float = Field(default=0.01, gt=0, description="alpha: the personalisation step size")
    meta_delta: float = Field(default=1e-3, gt=0, description="hf: finite-difference step")


class QFedAvgConfig(Strict):
    name: Literal["qfedavg"]
    q: float = Field(default=1.0, ge=0, description="fairness: 0 is FedAvg-like")
    lipschitz: float | None = Field(default=None, gt=0, description="L; default 1 / trainer.lr")
    buffer_size: int | None = Field(default=None, gt=0, description="async: step every K updates")
    max_staleness: int | None = Field(default=None, ge=0)


class FedAsyncConfig(Strict):
    name: Literal["fedasync"]
    alpha: float = Field(default=0.6, gt=0, le=1, description="mixing rate")
    staleness: StalenessConfig = StalenessConfig(kind="hinge", a=10.0, b=4.0)
    rho: float = Field(default=0.0, ge=0, description="proximal coefficient on clients")
    max_staleness: int | None = Field(default=None, ge=0)


class FedBuffConfig(Strict):
    name: Literal["fedbuff"]
    buffer_size: int = Field(default=10, gt=0, description="K updates per server step")
    staleness: StalenessConfig = StalenessConfig()
    example_weight: Literal["uniform", "n", "sqrt", "log"] = "uniform"
    normalize: Literal["count", "weight"] = "count"
    max_staleness: int | None = Field(default=None, ge=0)
    server_opt: ServerOptConfig = ServerOptConfig()
    clip_norm: float | None = Field(default=None, gt=0, description="clip each update's L2 norm first")


AlgorithmConfig = Annotated[
    Union[FedAvgConfig, FedProxConfig, PerFedAvgConfig, QFedAvgConfig, FedAsyncConfig, FedBuffConfig],
    Field(discriminator="name"),
]

# Which scheduling modes each algorithm makes sense in; the first is the default.
VALID_MODES: dict[str, tuple[str, ...]] = {
    "fedavg": ("sync",),
    "fedprox": ("sync",),
    "perfedavg": ("sync",),
    "qfedavg": ("sync", "async"),
    "fedasync": ("async",),
    "fedbuff": ("async", "sync"),
}


class SchedulerConfig(Strict):
    mode: Literal["sync", "async"] | None = None
    concurrency: int = Field(default=20, gt=0, description="async: clients training; sync: cohort")
    over_selection: float = Field(default=0.0, ge=0, description="sync: extra fraction selected")
    round_timeout: float | None = Field(default=None, gt=0, description="sync: virtual seconds")
    straggler: Literal["drop", "wait", "partial"] = "drop"


class RunSpec(Strict):
    name: str = Field(min_length=1)
    algorithm: AlgorithmConfig
    scheduler: SchedulerConfig = SchedulerConfig()

    @model_validator(mode="after")
    def _mode(self):
        valid = VALID_MODES[self.algorithm.name]
        if self.scheduler.mode is None:
            self.scheduler.mode = valid[0]
        elif self.scheduler.mode not in valid:
            raise ValueError(
                f"scheduler.mode {self.scheduler.mode!r} is not valid for {self.algorithm.name}; use {' or '.join(valid)}"
            )
        if self.scheduler.mode == "async" and (self.scheduler.over_selection or self.scheduler.round_timeout):
            raise ValueError("over_selection and round_timeout apply to sync mode only")
        if self.scheduler.straggler == "partial" and self.scheduler.round_timeout is None:
            raise ValueError("straggler 'partial' needs a round_timeout")
        a = self.algorithm
        if a.name == "qfedavg" and self.scheduler.mode == "async" and a.buffer_size is None:
            raise ValueError("qfedavg in async mode needs algorithm.buffer_size (updates per server step)")
        return self


class EvalConfig(Strict):
    every_seconds: float | None = Field(default=10.0, gt=0, description="virtual seconds between evaluations")
    every_versions: int | None = Field(default=None, gt=0, description="also evaluate every N server steps")

    @model_validator(mode="after")
    def _some(self):
        if self.every_seconds is None and self.every_versions is None:
            raise ValueError("set every_seconds or every_versions")
        return self


class StopConfig(Strict):
    max_time: float = Field(default=3600.0, gt=0, description="virtual seconds")
    max_trips: int | None = Field(default=None, gt=0)
    at_target: bool = Field(default=False, description="stop once the target accuracy is reached")


class ExperimentConfig(Strict):
    name: str = "experiment"
    seed: int = Field(default=0, ge=0)
    target_accuracy: float = Field(default=0.9, gt=0, le=1)
    executor: Literal["sequential", "batched"] = "sequential"
    executor_memory_mb: float = Field(default=512.0, gt=0, description="batched executor: memory per pass")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    population: PopulationConfig = PopulationConfig()
    trainer: TrainerConfig = TrainerConfig()
    eval: EvalConfig = EvalConfig()
    stop: StopConfig = StopConfig()
    runs: list[RunSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self):
        names = [r.name for r in self.runs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"run names must be unique, repeated: {sorted(dup)}")
        return self

    def run(self, name: str | None) -> RunSpec:
        if name is None:
            return self.runs[0]
        for r in self.runs:
            if r.name == name:
                return r
        raise ConfigError(f"run {name!r} not in this config; runs: {[r.name for r in self.runs]}")


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("asyncfl.presets").iterdir() if p.name.endswith(".yaml"))


def preset_dict(name: str) -> dict:
    if name not in preset_names():
        raise ConfigError(f"unknown preset {name!r}; presets: {preset_names()}")
    return yaml.safe_load(resources.files("asyncfl.presets").joinpath(f"{name}.yaml").read_text())


def apply_override(tree: dict, assignment: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML). In lists, a run may be named instead of
    indexed: `runs.fedbuff.algorithm.buffer_size=5`."""
    if "=" not in assignment:
        raise ConfigError(f"--set needs key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            pos = _list_position(node, part, key)
            if last:
                node[pos] = yaml.safe_load(raw)
            else:
                node = node[pos]
        elif isinstance(node, dict):
            if last:
                node[part] = yaml.safe_load(raw)
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {key}: {'.'.join(parts[:i])} is not a section")


def _list_position(items: list, part: str, key: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for j, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == part:
            return j
    raise ConfigError(f"--set {key}: no list entry {part!r}")


def validate(tree: dict) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            lines.append(f"  {loc}: {e['msg']}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def load(
    path: str | Path | None = None,
    preset: str | None = None,
    overrides: list[str] = (),
    seed: int | None = None,
) -> ExperimentConfig:
    if (path is None) == (preset is None):
        raise ConfigError("give exactly one of a config file and a preset")
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            tree = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    else:
        tree = preset_dict(preset)
    tree = copy.deepcopy(tree)
    for assignment in overrides:
        apply_override(tree, assignment)
    if seed is not None:
        tree["seed"] = seed
    return validate(tree)
