"""asyncfl.build stays light: the network server and client build what the simulator runs
without loading the simulator, reports, rich or matplotlib."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from asyncfl.algorithms.defs.registry import MODULES

FORBIDDEN = ("asyncfl.sim", "asyncfl.report", "rich", "matplotlib")

# Third-party libraries asyncfl.build needs are imported first: what they load themselves (this
# scikit-learn imports rich when it is installed) is not asyncfl's doing.
SCRIPT = """
import json, sys
import numpy, torch, sklearn.datasets, sklearn.model_selection, pydantic, yaml
forbidden = {forbidden!r}
def loaded():
    return sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
before = loaded()
from asyncfl import build, config
cfg = config.load(preset="quickstart")
data = build.build_data(cfg)
model = build.build_flat_model(cfg, data)
for spec in cfg.runs:
    build.build_trainer(cfg, spec, model)
    build.build_aggregator(spec, cfg.trainer.lr, num_users=build.num_users(cfg, data), seed=cfg.seed)
    build.build_policy(spec.scheduler)
    build.build_codecs(spec)
print(json.dumps({{"before": before, "after": loaded(), "runs": len(cfg.runs)}}))
"""


def python(script: str) -> str:
    """stdout of `script` in a fresh interpreter on this checkout's sources."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True).stdout


def test_build_imports_no_simulator_report_rich_or_matplotlib():
    out = python(SCRIPT.format(forbidden=FORBIDDEN))
    result = json.loads(out.strip().splitlines()[-1])
    assert result["runs"] == 4
    assert not [m for m in result["before"] if m.startswith(("asyncfl", "matplotlib"))]
    assert [m for m in result["after"] if m not in result["before"]] == []


@pytest.mark.parametrize("entry", ["asyncfl.algorithms.defs.fedbuff", "asyncfl.algorithms.defs.registry",
                                   "asyncfl.config.training", "asyncfl.scheduling", "asyncfl.build"])
def test_any_entry_point_sees_every_algorithm(entry):
    """The schema and the algorithm modules import each other; whichever a process loads first,
    the `algorithm:` section ends up with every registered algorithm."""
    script = (f"import importlib, typing; importlib.import_module({entry!r}); from asyncfl import config; "
              "from asyncfl.algorithms.defs.registry import definitions; "
              "print(len(typing.get_args(typing.get_args(config.AlgorithmConfig)[0])), len(definitions()))")
    n = str(len(MODULES))
    assert python(script).split() == [n, n]
