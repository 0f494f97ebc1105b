"""Typed experiment configuration, validated at the edge with errors that name the field.

An experiment holds the shared settings (data, model, population, trainer, evaluation, stop)
and a list of runs, each naming an algorithm and a scheduling policy. `simulate` executes one
run, `compare` all of them side by side. One schema module per subsystem; `loader` turns
presets, files and `--set` overrides into a validated `ExperimentConfig`. The `algorithm:`
section comes from the algorithm registry (`asyncfl.algorithms.defs`).

The run and experiment schemas (`experiment`, `loader`) are loaded on first use: they are built
from the registry, whose algorithm modules build on the schema pieces above, so loading them
here eagerly would make every algorithm module import itself back through this package.
"""

import importlib

from asyncfl.config.base import ConfigError, Strict
from asyncfl.config.data import USER_DATASETS, DataConfig, PartitionConfig, ShakespeareConfig, SyntheticConfig
from asyncfl.config.model import ModelConfig
from asyncfl.config.population import AttackConfig, Availability, Dist, PopulationConfig, TraceConfig
from asyncfl.config.privacy import AdaptiveClipConfig, PrivacyConfig
from asyncfl.config.robustness import MatrixAttack, MatrixDefence, RobustnessConfig
from asyncfl.config.scheduler import SchedulerConfig
from asyncfl.config.secure_aggregation import SecureAggregationConfig
from asyncfl.config.server import NormGuardConfig, ServerConfig
from asyncfl.config.study import StudyConfig, StudyMethod, StudyRatio
from asyncfl.config.training import RoundAggregation, ServerOptConfig, StalenessConfig, TrainerConfig
from asyncfl.config.transport import CompressionConfig

_LAZY = {
    name: "experiment"
    for name in (
        "AlgorithmConfig",
        "EvalConfig",
        "ExperimentConfig",
        "RunSpec",
        "StopConfig",
        "TargetConfig",
        "privacy_denominator",
    )
}
_LAZY |= {
    name: "loader" for name in ("apply_override", "apply_quick", "load", "preset_dict", "preset_names", "validate")
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AdaptiveClipConfig",
    "AlgorithmConfig",
    "AttackConfig",
    "Availability",
    "CompressionConfig",
    "ConfigError",
    "DataConfig",
    "Dist",
    "EvalConfig",
    "ExperimentConfig",
    "ModelConfig",
    "NormGuardConfig",
    "PartitionConfig",
    "PopulationConfig",
    "PrivacyConfig",
    "RoundAggregation",
    "RunSpec",
    "SchedulerConfig",
    "SecureAggregationConfig",
    "ServerConfig",
    "ServerOptConfig",
    "ShakespeareConfig",
    "StalenessConfig",
    "StopConfig",
    "Strict",
    "RobustnessConfig",
    "MatrixAttack",
    "MatrixDefence",
    "StudyConfig",
    "StudyMethod",
    "StudyRatio",
    "SyntheticConfig",
    "TargetConfig",
    "TraceConfig",
    "TrainerConfig",
    "USER_DATASETS",
    "apply_override",
    "apply_quick",
    "load",
    "preset_dict",
    "preset_names",
    "privacy_denominator",
    "validate",
]
