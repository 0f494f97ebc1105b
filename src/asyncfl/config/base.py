"""The base of every configuration section: strict models and the user-facing error."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A configuration problem, phrased for the user, naming the offending field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
