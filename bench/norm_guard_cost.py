"""What the default norm guard costs honest clients: every run of the named presets, with the
guard off (the simulator's default) and with the server's defaults (`runs[].norm_guard: {}`),
side by side: honest updates refused and final accuracy.

    python bench/norm_guard_cost.py [--presets quickstart privacy ...] [--json]
"""

from __future__ import annotations

import argparse
import json

import torch

from asyncfl import config
from asyncfl.build import build_data
from asyncfl.experiment import run_one

PRESETS = ["quickstart", "compression", "fedasync-staleness", "qfedavg-fairness", "privacy"]


def measure(preset: str) -> list[dict]:
    cfg = config.load(preset=preset)
    data = build_data(cfg)
    rows = []
    for spec in cfg.runs:
        off = run_one(cfg, spec, data)
        on = run_one(cfg, spec.model_copy(update={"norm_guard": config.NormGuardConfig()}), data)
        refused = on.discarded - off.discarded  # what the guard refused (honest clients only)
        rows.append(
            {
                "preset": preset,
                "run": spec.name,
                "completed": on.completed,
                "refused": refused,
                "refused_share": refused / max(on.completed, 1),
                "accuracy_off": off.rows[-1]["test_accuracy"],
                "accuracy_on": on.rows[-1]["test_accuracy"],
            }
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for preset in args.presets for r in measure(preset)]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| preset | run | honest updates refused | final accuracy off -> on |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['preset']} | {r['run']} | {r['refused']} of {r['completed']} ({100 * r['refused_share']:.1f} %) "
            f"| {r['accuracy_off']:.3f} -> {r['accuracy_on']:.3f} |"
        )


if __name__ == "__main__":
    main()
