"""Server settings: the `server:` section of the experiment config, optionally merged with a
separate YAML of its own (`--server-config`)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from asyncfl import config
from asyncfl.config import ConfigError, ExperimentConfig, ServerConfig

__all__ = ["ServerConfig", "load_serve_config"]


def load_serve_config(
    path: str | Path, overrides: list[str] = (), server_path: str | Path | None = None, seed: int | None = None
) -> tuple[ExperimentConfig, ServerConfig]:
    """Experiment config plus server settings. `--set server.lease_timeout=30` works too."""
    extra = []
    if server_path is not None:
        try:
            tree = yaml.safe_load(Path(server_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"server config {server_path}: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"server config {server_path} must hold a mapping")
        extra = [f"server.{k}={json.dumps(v)}" for k, v in tree.items()]
    cfg = config.load(path, None, [*extra, *overrides], seed)
    return cfg, cfg.server
