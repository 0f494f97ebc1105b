"""asyncfl: asynchronous cross-device federated learning.

The Python API (`load_config`, `simulate`, `compare`, `FederatedData`, `Result`) loads on
first use, so that `import asyncfl` stays light for the network client and the CLI.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {
    "FederatedData": "asyncfl.data.user",
    "Result": "asyncfl.api",
    "compare": "asyncfl.api",
    "load_config": "asyncfl.api",
    "simulate": "asyncfl.api",
}

__all__ = ["FederatedData", "Result", "compare", "load_config", "simulate"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
