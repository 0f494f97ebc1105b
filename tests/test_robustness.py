"""Robustness matrices: their config, their plan, and the byzantine preset's smoke test."""

from __future__ import annotations

import csv
import json

import pytest

from asyncfl import config
from asyncfl.cli import main
from asyncfl.robustness import plan


def byzantine(**robustness) -> dict:
    tree = config.preset_dict("byzantine")
    tree.pop("quick")
    tree["robustness"].update(robustness)
    return tree


@pytest.mark.parametrize(
    "change, message",
    [
        ({"defences": [{"name": "k", "set": {}, "runs": ["nope"]}], "goal": None}, "'nope' is not a run"),
        ({"goal": {"defence": "x", "fraction": 0.2, "attacks": [], "max_cost": 2}}, "'x' is not a defence"),
        ({"goal": {"defence": "none", "fraction": 0.5, "attacks": [], "max_cost": 2}}, "0.5 is not one of fractions"),
        ({"goal": {"defence": "none", "fraction": 0.2, "attacks": ["z"], "max_cost": 2}}, "not attacks of the matrix"),
        ({"fractions": [0.2, 0.2]}, "fractions repeat"),
        ({"fractions": [1.0]}, "less than 1"),
        ({"attacks": [{"name": "a", "kind": "bitflip"}]}, "attacks.0.kind"),
    ],
)
def test_bad_matrices_are_refused_with_the_reason(change, message):
    with pytest.raises(config.ConfigError, match=message):
        config.validate(byzantine(**change))


def test_study_and_matrix_exclude_each_other_and_a_misfit_defence_names_itself():
    tree = byzantine()
    tree["study"] = {"concurrency": [20], "methods": [{"name": "fedbuff"}]}
    with pytest.raises(config.ConfigError, match="study or robustness, not both"):
        config.validate(tree)
    kardam_everywhere = byzantine(
        defences=[{"name": "kardam", "set": {"algorithm.filter": {"kind": "kardam"}}}], goal=None
    )
    with pytest.raises(config.ConfigError, match="defence 'kardam' on run 'fedavg'"):
        plan(config.validate(kardam_everywhere))


def test_plan_covers_every_cell_once():
    cfg = config.load(preset="byzantine")
    cells = plan(cfg)
    # fedbuff: 6 defences, fedavg: 5 (no Kardam); 1 + 5 x 3 attack cases; 3 seeds
    assert len(cells) == (6 + 5) * 16 * 3 == len({(c.run, c.defence, c.column, c.seed) for c in cells})
    one = next(c for c in cells if c.defence == "median" and c.attack == "scale x10" and c.fraction == 0.3)
    assert one.tree["runs"][0]["algorithm"]["aggregation"] == "median"
    assert one.tree["population"]["attack"]["kind"] == "scale" and one.tree["population"]["attack"]["fraction"] == 0.3
    clean = next(c for c in cells if c.attack is None and c.defence == "norm guard" and c.run == "fedavg")
    assert clean.tree["population"]["attack"]["fraction"] == 0 and clean.tree["runs"][0]["norm_guard"] is not None


def test_byzantine_quick_writes_the_matrix_and_its_outcomes_hold(tmp_path, capsys):
    """`asyncfl compare --preset byzantine --quick`: undefended sign flips destroy both
    algorithms; the default norm guard keeps them within 10 points of no attack."""
    assert main(["compare", "--preset", "byzantine", "--quick", "--threads", "1", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    cells = {(b["run"], b["defence"], b["column"]): b for b in summary["matrix"]}
    assert len(cells) == 2 * 3 * 3
    for run in ("fedbuff", "fedavg"):
        assert cells[(run, "none", "sign flip x10 @ 20%")]["mean"] < 0.2
        guarded = cells[(run, "norm guard", "sign flip x10 @ 20%")]
        assert guarded["cost_points"] < 10 and guarded["refused_trips"] > 0
        assert cells[(run, "none", "no attack")]["refused_trips"] == 0
    assert {r["run"] for r in summary["goal"]["results"]} == {"fedbuff", "fedavg"}
    with (tmp_path / "results.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 18
    table = (tmp_path / "table.md").read_text()
    assert "| norm guard |" in table and "Goal:" in table
    assert (tmp_path / "byzantine-fedbuff.png").stat().st_size > 0 and (tmp_path / "config.yaml").exists()
    capsys.readouterr()
    assert main(["compare", "--preset", "byzantine", "--quick", "--seed", "3", "--out", str(tmp_path / "x")]) == 2
    assert "robustness.seeds" in capsys.readouterr().out
