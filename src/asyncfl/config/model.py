"""The model architecture a run trains."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from asyncfl.config.base import Strict


class ModelConfig(Strict):
    name: Literal["logreg", "mlp", "cnn", "femnist_cnn", "cifar_cnn", "char_gru"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default=[64], description="mlp layers; char_gru: [state size]")
    width: int = Field(default=16, gt=0, description="cnn channels")
    embed: int = Field(default=8, gt=0, description="char_gru embedding size")
