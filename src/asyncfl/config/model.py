"""The model architecture a run trains."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from asyncfl.config.base import Strict


class ModelConfig(Strict):
    name: Literal["logreg", "mlp", "cnn", "femnist_cnn", "cifar_cnn", "char_gru"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default=[64], description="mlp layers; char_gru: [state size]")
    width: int = Field(default=16, gt=0, description="cnn channels")
    embed: int = Field(default=8, gt=0, description="char_gru embedding size")
    factory: str | None = Field(
        default=None,
        pattern=r"^[\w.]+:[\w.]+$",
        description="package.module:function returning a torch.nn.Module (your own model); replaces name",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the factory")

    @model_validator(mode="after")
    def _factory(self):
        if self.kwargs and self.factory is None:
            raise ValueError("model.kwargs needs model.factory")
        return self
