"""Presets, `--set` overrides, `--quick` and validation: from YAML to an ExperimentConfig."""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from asyncfl.config.base import ConfigError
from asyncfl.config.experiment import ExperimentConfig


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
