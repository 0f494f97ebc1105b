"""Robustness matrices: runs x defences x attacks x attacker shares x seeds, and their table
of final accuracy (`asyncfl compare` on a config with a `robustness:` section; the runner is
`asyncfl.robustness.runner.run_robustness`)."""

from asyncfl.robustness.planning import Cell, plan

__all__ = ["Cell", "plan"]
