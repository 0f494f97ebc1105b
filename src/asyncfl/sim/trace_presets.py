"""Traces the package generates (no download), named `builtin:NAME/FILE` in a config: a
deterministic stand-in for measured phones, written in our CSV trace format.

`phones`: 60 devices over a compressed day of 600 virtual seconds. Most are online in one long
evening-to-morning window (charging, on Wi-Fi) around a shared night, some also for a short
spell during the day, so eligibility comes and goes for the whole population together; the
diurnal model's independent phases keep the eligible fraction steady instead. Compute speeds
and bandwidths come in three device tiers.
"""

from __future__ import annotations

import numpy as np

PHONES_DEVICES, PHONES_PERIOD = 60, 600.0
TIERS = (  # (share, s per example, download bytes/s, upload bytes/s): low-end, mid, flagship
    (0.3, 0.12, 4.0e5, 1.0e5),
    (0.5, 0.05, 1.0e6, 2.5e5),
    (0.2, 0.02, 3.0e6, 8.0e5),
)


def phones() -> dict[str, str]:
    """{"capacity.csv": text, "availability.csv": text}, the same on every call."""
    rng = np.random.default_rng(20260)
    capacity = ["device,compute_s_per_example,download_bytes_per_s,upload_bytes_per_s"]
    availability = ["device,start,end"]
    shares = np.array([t[0] for t in TIERS])
    for d in range(PHONES_DEVICES):
        _, compute, down, up = TIERS[rng.choice(len(TIERS), p=shares)]
        jitter = np.exp(0.3 * rng.standard_normal(3))
        capacity.append(f"phone{d},{compute * jitter[0]:.5g},{down * jitter[1]:.5g},{up * jitter[2]:.5g}")
        start = min(max(0.75 + 0.05 * rng.standard_normal(), 0.0), 0.99) * PHONES_PERIOD  # evening
        windows = [(start, start + rng.uniform(0.3, 0.45) * PHONES_PERIOD)]
        if rng.random() < 0.4:  # a short daytime spell
            s = rng.uniform(0.25, 0.6) * PHONES_PERIOD
            windows.append((s, s + rng.uniform(0.03, 0.08) * PHONES_PERIOD))
        for s, e in windows:  # the part past the period's end wraps to its start
            for a, b in ((s, min(e, PHONES_PERIOD)), (0.0, e - PHONES_PERIOD)):
                if b > a:
                    availability.append(f"phone{d},{a:.1f},{b:.1f}")
    return {"capacity.csv": "\n".join(capacity) + "\n", "availability.csv": "\n".join(availability) + "\n"}


GENERATORS = {"phones": phones}


def builtin_csv(name: str) -> str:
    """The text of `NAME/FILE`, e.g. `phones/capacity.csv`."""
    trace, _, file = name.partition("/")
    if trace not in GENERATORS or file not in ("capacity.csv", "availability.csv"):
        raise ValueError(
            f"builtin:{name}: no such generated trace; use builtin:NAME/capacity.csv or builtin:NAME/availability.csv "
            f"with NAME in {sorted(GENERATORS)}"
        )
    return GENERATORS[trace]()[file]
