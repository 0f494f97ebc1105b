"""Model zoo. Every model is used through `FlatModel`: algorithms only see flat vectors."""

from asyncfl.models.flat import FlatModel
from asyncfl.models.zoo import MODELS, build_model

__all__ = ["FlatModel", "MODELS", "build_model"]
