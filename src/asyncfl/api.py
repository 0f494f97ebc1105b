"""The Python API: load a config, simulate it with any torch module and data, and get the
CLI's results back as Python objects (`Result`).

    import asyncfl
    data = asyncfl.FederatedData.from_arrays(x, y, client_ids, test=(x_test, y_test))
    cfg = asyncfl.load_config("quickstart", overrides={"runs.fedbuff.algorithm.buffer_size": 20})
    result = asyncfl.compare(cfg, model=MyNet(), data=data)
    result.summary, result.metrics, result.plot()
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from torch import nn

from asyncfl.build import split_client_tests
from asyncfl.config import ConfigError, ExperimentConfig, load
from asyncfl.data.federated import FederatedDataset
from asyncfl.sim.metrics import Metrics, Target


def load_config(
    preset_or_path: str | Path, overrides: dict | None = None, *, quick: bool = False, seed: int | None = None
) -> ExperimentConfig:
    """A preset by name, or a YAML file, with `overrides` as {dotted key: value} (the CLI's
    --set; runs addressed by name: {"runs.fedbuff.algorithm.buffer_size": 20}); `quick` applies
    the config's quick: block first."""
    sets = [f"{key}={json.dumps(value)}" for key, value in (overrides or {}).items()]
    is_file = Path(preset_or_path).suffix in (".yaml", ".yml") or Path(preset_or_path).is_file()
    path, preset = (preset_or_path, None) if is_file else (None, str(preset_or_path))
    return load(path, preset, sets, seed, quick=quick)


@dataclass
class Result:
    """What a simulation produced: `summary` is summary.json's dict, `runs` each run's `Metrics`,
    `out` the folder holding the CLI's files (summary.json, config.yaml, */metrics.csv, PNGs)."""

    summary: dict
    runs: dict[str, Metrics]
    out: Path

    @property
    def metrics(self):
        """Every evaluation row of every run, with a `run` column: a pandas DataFrame when pandas
        is installed, else a list of dicts."""
        rows = [{"run": name, **row} for name, m in self.runs.items() for row in m.rows]
        try:
            import pandas
        except ImportError:
            return rows
        return pandas.DataFrame(rows)

    def plot(self, folder: str | Path | None = None) -> list[Path]:
        """The CLI's comparison figures (accuracy vs time and vs trips, staleness), written to
        `folder` (default: the result's folder); returns the PNG paths."""
        from asyncfl.report.plots import write_plots

        out = Path(folder) if folder is not None else self.out
        out.mkdir(parents=True, exist_ok=True)
        t = self.summary.get("target")
        target = Target(**t) if t else Target(value=self.summary["target_accuracy"])
        return write_plots(self.runs, target, out, self.summary["preset"])


def simulate(
    cfg: ExperimentConfig,
    model: nn.Module | None = None,
    data: FederatedDataset | None = None,
    *,
    run: str | None = None,
    out: str | Path | None = None,
    threads: int | str = 1,
    verbose: bool = False,
    metrics: list[Callable] = (),
) -> Result:
    """One run of `cfg` (`run` names it; default the first), training `model` (any torch module;
    default the config's) on `data` (default the config's dataset). See `compare`."""
    return compare(
        cfg, model, data, runs=[cfg.run(run).name], out=out, threads=threads, verbose=verbose, metrics=metrics
    )


def compare(
    cfg: ExperimentConfig,
    model: nn.Module | None = None,
    data: FederatedDataset | None = None,
    *,
    runs: list[str] | None = None,
    out: str | Path | None = None,
    threads: int | str = 1,
    verbose: bool = False,
    metrics: list[Callable] = (),
) -> Result:
    """The config's runs (or those named) side by side, each from `model`'s current weights.
    Writes the CLI's outputs to `out` (default: a new temporary folder); `threads` is torch's
    thread count or "auto" (the CLI's default); `verbose` prints the CLI's progress and table.
    `metrics`: functions f(logits, y) -> float or {name: float}, defined at module level, added to
    eval.metrics (a target may then be set on what they report)."""
    if cfg.study is not None or cfg.robustness is not None:
        raise ConfigError("studies and robustness matrices run from the CLI (asyncfl compare)")
    if metrics:
        names = [*cfg.eval.metrics, *(_function_path(f) for f in metrics)]
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"metrics": names})})
    if data is not None:
        data = split_client_tests(data, cfg.data.client_test_fraction, cfg.seed)
    folder = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="asyncfl-"))
    from asyncfl.experiment import execute

    console = Console() if verbose else Console(quiet=True)
    summary, results = execute(cfg, folder, runs, console, threads, data, model)
    return Result(summary, results, folder)


def _function_path(f: Callable) -> str:
    """ "module:function" of a module-level function: how config.yaml names it."""
    name = getattr(f, "__qualname__", "")
    if not name or "<" in name:
        raise ConfigError(f"metrics: {f!r} must be a function defined at module level (config.yaml names it)")
    return f"{f.__module__}:{name}"
