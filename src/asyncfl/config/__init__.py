"""Typed experiment configuration, validated at the edge with errors that name the field.

An experiment holds the shared settings (data, model, population, trainer, evaluation, stop)
and a list of runs, each naming an algorithm and a scheduling policy. `simulate` executes one
run, `compare` all of them side by side. One schema module per subsystem; `loader` turns
presets, files and `--set` overrides into a validated `ExperimentConfig`. The `algorithm:`
section comes from the algorithm registry (`asyncfl.algorithms.defs`).
"""

from asyncfl.config.base import ConfigError, Strict
from asyncfl.config.data import USER_DATASETS, DataConfig, PartitionConfig, ShakespeareConfig, SyntheticConfig
from asyncfl.config.model import ModelConfig
from asyncfl.config.population import AttackConfig, Availability, Dist, PopulationConfig
from asyncfl.config.privacy import AdaptiveClipConfig, PrivacyConfig
from asyncfl.config.scheduler import SchedulerConfig
from asyncfl.config.server import ServerConfig
from asyncfl.config.study import StudyConfig, StudyMethod, StudyRatio
from asyncfl.config.training import RoundAggregation, ServerOptConfig, StalenessConfig, TrainerConfig
from asyncfl.config.transport import CompressionConfig
from asyncfl.config.experiment import (AlgorithmConfig, EvalConfig, ExperimentConfig, RunSpec, StopConfig,
                                       privacy_denominator)
from asyncfl.config.loader import apply_override, apply_quick, load, preset_dict, preset_names, validate

__all__ = [
    "AdaptiveClipConfig", "AlgorithmConfig", "AttackConfig", "Availability", "CompressionConfig", "ConfigError",
    "DataConfig", "Dist", "EvalConfig", "ExperimentConfig", "ModelConfig", "PartitionConfig", "PopulationConfig",
    "PrivacyConfig", "RoundAggregation", "RunSpec", "SchedulerConfig", "ServerConfig", "ServerOptConfig",
    "ShakespeareConfig", "StalenessConfig", "StopConfig", "Strict", "StudyConfig", "StudyMethod", "StudyRatio",
    "SyntheticConfig", "TrainerConfig", "USER_DATASETS", "apply_override", "apply_quick", "load",
    "preset_dict", "preset_names", "privacy_denominator", "validate",
]
