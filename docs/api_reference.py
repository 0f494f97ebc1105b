"""Builds the HTML API reference of asyncfl's public API from its docstrings (pdoc), and fails on
any warning pdoc raises (an annotation it cannot parse, a module it cannot import), so that
`make test` keeps the reference building cleanly.

    python docs/api_reference.py [OUT] [MODULE ...]     # default: build/api, the modules below
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pdoc

# what a user calls, and what they plug in or get back
MODULES = [
    "asyncfl",  # load_config, simulate, compare, Result, FederatedData
    "asyncfl.api",
    "asyncfl.data.user",  # FederatedData's constructors
    "asyncfl.data.federated",  # FederatedDataset: what a data loader may return
    "asyncfl.models.custom",  # how a user's module meets flat examples
    "asyncfl.plugins",  # model.factory, data.loader, the client's --data
    "asyncfl.sim.metrics",  # Result.runs: Metrics, Target
    "asyncfl.config",  # ExperimentConfig: what load_config returns, the YAML schema
    "asyncfl.algorithms.defs.registry",  # adding an algorithm: its definition
    "asyncfl.algorithms.aggregators",  # ... its aggregator
    "asyncfl.algorithms.types",  # ... the updates it folds in
    "asyncfl.algorithms.server_opt",  # ... and the server optimizers it may step with
]


def build(out: Path, modules: list[str] = MODULES) -> list[str]:
    """Write the reference of `modules` to `out`; returns pdoc's warnings (empty when clean)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules, output_directory=out)
    return [f"{w.category.__name__}: {w.message}" for w in caught]


def main(argv: list[str]) -> int:
    out = Path(argv[0]) if argv else Path("build/api")
    found = build(out, argv[1:] or MODULES)
    for message in found:
        print(message, file=sys.stderr)
    if found:
        print(f"api reference: {len(found)} warning(s); fix the docstrings or annotations named", file=sys.stderr)
        return 1
    print(f"api reference: {out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
