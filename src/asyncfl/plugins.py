"""User code named in a config or on the command line as "package.module:function": a model
factory (`model.factory`), a data loader (`data.loader`, the client's `--data`). Errors say
which of these failed and how: module not found, no such function, wrong return type."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable

from torch import nn

from asyncfl.config.base import ConfigError
from asyncfl.data.federated import FederatedDataset
from asyncfl.data.user import FederatedData, as_tensors


def import_object(spec: str, what: str) -> Callable:
    """The callable `spec` ("package.module:function") names; `what` ("model.factory") says
    where it was named, for errors."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{what}: expected 'package.module:function', got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        inner = "" if err.name == module_name else f" (it imports {err.name!r}, which is missing)"
        raise ConfigError(f"{what}: module {module_name!r} not found{inner}; is it on PYTHONPATH?") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{what}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{what}: {spec} is a {type(obj).__name__}, not a function")
    return obj


def call(spec: str, what: str, kwargs: dict):
    """Call the function `spec` names with `kwargs`; a call that does not fit its signature
    is the config's error."""
    function = import_object(spec, what)
    try:
        inspect.signature(function).bind(**kwargs)
    except TypeError as err:
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        raise ConfigError(f"{what}: calling {spec}({args}) failed: {err}") from None
    except ValueError:  # no signature to check (a builtin): let the call tell
        pass
    return function(**kwargs)


def build_module(spec: str, kwargs: dict, data) -> nn.Module:
    """Call a model factory with `kwargs`; parameters it declares named num_features,
    num_classes or example_shape and not in `kwargs` get the data's."""
    factory = import_object(spec, "model.factory")
    known = {
        "num_features": getattr(data, "num_features", None),
        "num_classes": data.num_classes,
        "example_shape": getattr(data, "example_shape", None),
    }
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: kwargs only
        params = {}
    filled = {k: v for k, v in known.items() if k in params and k not in kwargs}
    module = call(spec, "model.factory", {**kwargs, **filled})
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.factory: {spec} returned {type(module).__name__}, expected a torch.nn.Module")
    return module


def load_federated(spec: str, kwargs: dict, partition_kind: str, num_clients: int, seed: int, **partition_params):
    """Call a data loader: it returns a FederatedDataset (e.g. asyncfl.FederatedData, its own
    clients) or a (train, test) pair of (x, y) arrays or torch Datasets, which `partition_kind`
    splits over `num_clients`."""
    loaded = call(spec, "data.loader", kwargs)
    if isinstance(loaded, FederatedDataset):
        return loaded
    if not (isinstance(loaded, tuple) and len(loaded) == 2):
        raise ConfigError(
            f"data.loader: {spec} returned {type(loaded).__name__}; expected asyncfl.FederatedData "
            "or a (train, test) pair of (x, y) arrays or torch Datasets"
        )
    if partition_kind == "natural":
        raise ConfigError(
            f"data.loader: {spec} returned (train, test) without clients: set data.partition.kind "
            "(iid, dirichlet, shards, quantity_skew) to split it, or return asyncfl.FederatedData"
        )
    train, test = loaded
    try:
        return FederatedData.from_dataset(train, num_clients, test, partition_kind, seed, **partition_params)
    except ValueError as err:
        raise ConfigError(f"data.loader: {spec}: {err}") from None


def load_device_data(spec: str):
    """The network client's `--data package.module:function`: its (x, y) examples, from a
    function returning (x, y) arrays or a torch Dataset; x keeps its example shape."""
    loaded = call(spec, "--data", {})
    try:
        return as_tensors(loaded, f"--data {spec}")
    except ValueError as err:
        raise ConfigError(str(err)) from None
