"""Robustness matrices: runs x defences x attacks x attacker shares x seeds, and their table
of final accuracy (`asyncfl compare` on a config with a `robustness:` section)."""

from asyncfl.robustness.planning import Cell, plan
from asyncfl.robustness.runner import run_robustness

__all__ = ["Cell", "plan", "run_robustness"]
