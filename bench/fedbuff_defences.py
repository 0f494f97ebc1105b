"""FedBuff on digits against sign-flip attackers: final accuracy with each defence.

The setup of tests/test_byzantine_async.py (tests/conftest.py's `small` experiment: 40 devices,
an MLP, 200 virtual seconds, FedBuff K = 4, concurrency 8), with no attack and with 20 % of the
devices sending -10 x their update, undefended, with the coordinate median or trimmed mean over
the buffer, and behind Kardam's Lipschitz filter.

    python bench/fedbuff_defences.py [--seeds 1 2 3]
"""

from __future__ import annotations

import argparse
import statistics

from asyncfl import config
from asyncfl.experiment import run_one

DEFENCES = {
    "none": {},
    "median": {"aggregation": "median"},
    "trimmed_mean (0.25)": {"aggregation": "trimmed_mean", "trim_fraction": 0.25},
    "kardam": {"filter": {"kind": "kardam"}},
}
ATTACKS = {"no attack": None, "20% sign flip x10": {"fraction": 0.2, "kind": "sign_flip", "factor": 10}}


def experiment(seed: int, attack: dict | None, defence: dict) -> config.ExperimentConfig:
    population = {"devices": 40, "dropout": 0.0} | ({"attack": attack} if attack else {})
    return config.validate(
        {
            "name": "fedbuff-defences",
            "seed": seed,
            "population": population,
            "model": {"name": "mlp", "hidden": [32]},
            "trainer": {"lr": 0.1, "batch_size": 16, "local_steps": 5},
            "eval": {"every_seconds": 10},
            "stop": {"max_time": 200},
            "runs": [
                {
                    "name": "fedbuff",
                    "algorithm": {"name": "fedbuff", "buffer_size": 4, **defence},
                    "scheduler": {"concurrency": 8},
                }
            ],
        }
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    args = p.parse_args()
    print(f"| attack | defence | final accuracy (seeds {', '.join(map(str, args.seeds))}) | mean | refused |")
    print("|---|---|---|---|---|")
    for attack_name, attack in ATTACKS.items():
        for name, defence in DEFENCES.items():
            accs, refused = [], 0
            for seed in args.seeds:
                cfg = experiment(seed, attack, defence)
                m = run_one(cfg, cfg.runs[0])
                accs.append(m.rows[-1]["test_accuracy"])
                refused += m.discarded
            cells = " / ".join(f"{a:.3f}" for a in accs)
            print(f"| {attack_name} | {name} | {cells} | {statistics.mean(accs):.3f} | {refused} |")


if __name__ == "__main__":
    main()
