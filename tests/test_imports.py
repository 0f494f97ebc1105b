"""asyncfl.build stays light: the network server and client build what the simulator runs
without loading the simulator, reports, rich or matplotlib; the client runtime loads no server
code either; and no module imports itself back through others."""

import ast
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


@pytest.mark.parametrize(
    "entry",
    [
        "asyncfl.algorithms.defs.fedbuff",
        "asyncfl.algorithms.defs.fednova",
        "asyncfl.algorithms.fednova",
        "asyncfl.algorithms.defs.registry",
        "asyncfl.config.training",
        "asyncfl.scheduling",
        "asyncfl.build",
    ],
)
def test_any_entry_point_sees_every_algorithm(entry):
    """The run schema is built from the registry, whose algorithm modules build on the schema's
    pieces; whichever a process loads first, the `algorithm:` section ends up with every
    registered algorithm."""
    script = (
        f"import importlib, typing; importlib.import_module({entry!r}); from asyncfl import config; "
        "from asyncfl.algorithms.defs.registry import definitions; "
        "print(len(typing.get_args(typing.get_args(config.AlgorithmConfig)[0])), len(definitions()))"
    )
    n = str(len(MODULES))
    assert python(script).split() == [n, n]


CLIENT_SCRIPT = """
import json, sys
import numpy, torch, sklearn.datasets, sklearn.model_selection, pydantic, yaml, httpx
forbidden = {forbidden!r}
def loaded():
    return sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
before = loaded()
import asyncfl.client.runtime, asyncfl.client.main
print(json.dumps({{"before": before, "after": loaded()}}))
"""


def test_client_runtime_loads_no_simulator_server_or_reports():
    result = json.loads(
        python(CLIENT_SCRIPT.format(forbidden=(*FORBIDDEN, "asyncfl.server", "fastapi", "uvicorn")))
        .strip()
        .splitlines()[-1]
    )
    assert not [m for m in result["before"] if m.startswith("asyncfl")]
    assert [m for m in result["after"] if m not in result["before"]] == []


def module_imports(src: Path) -> dict[str, set[str]]:
    """For every asyncfl module, the asyncfl modules its top-level code imports (imports inside
    functions run later and under TYPE_CHECKING never). Importing a.b.c runs a and a.b first,
    so those count too, except the importer's own packages, which Python has already begun."""
    files = {".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): p for p in src.rglob("*.py")}

    def top_level(body):
        for node in body:
            if isinstance(node, ast.Import):
                yield from (a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                yield node.module
                yield from (f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.dump(node.test):
                yield from top_level(node.body + node.orelse)
            elif isinstance(node, ast.Try):
                yield from top_level(node.body + [n for h in node.handlers for n in h.body])

    graph = {}
    for name, path in files.items():
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        deps = set()
        for target in top_level(ast.parse(path.read_text()).body):
            parts = target.split(".")
            deps |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & files.keys()
        graph[name] = deps - own
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on.discard(group[-1])
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = module_imports(Path(__file__).resolve().parents[1] / "src")
    assert len(graph) > 50 and "asyncfl.algorithms.defs.registry" in graph["asyncfl.config.experiment"]
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
