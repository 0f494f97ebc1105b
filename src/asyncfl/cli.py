"""`asyncfl` command line: simulate one run, or compare a preset's runs side by side."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from asyncfl import config
from asyncfl.experiment import run_experiment


def _add_config_args(p: argparse.ArgumentParser, allow_file: bool) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    if allow_file:
        src.add_argument("--config", type=Path, help="experiment YAML file")
    src.add_argument("--preset", help=f"built-in experiment: {', '.join(config.preset_names())}")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set population.devices=500 "
                        "or --set runs.fedbuff.algorithm.buffer_size=5 (repeatable)")
    p.add_argument("--seed", type=int, help="override the experiment seed")
    p.add_argument("--out", type=Path, required=True, help="results directory")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="asyncfl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run one simulation")
    _add_config_args(sim, allow_file=True)
    sim.add_argument("--run", help="which of the config's runs (default: the first)")
    cmp_ = sub.add_parser("compare", help="run every run of a preset or config side by side")
    _add_config_args(cmp_, allow_file=True)
    sub.add_parser("presets", help="list the built-in presets")
    args = parser.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=150)
    try:
        if args.command == "presets":
            for name in config.preset_names():
                console.print(name)
            return 0
        cfg = config.load(getattr(args, "config", None), args.preset, args.overrides, args.seed)
        runs = [cfg.run(args.run).name] if args.command == "simulate" else None
        run_experiment(cfg, args.out, runs, console)
    except config.ConfigError as err:
        console.print(f"[red]error:[/red] {err}", highlight=False)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
