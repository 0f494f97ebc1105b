"""The simulator's event queue: earliest time first, events at the same time in push order.

It runs once per trip start and once per trip end, so it is built for speed at 10^4 pending
events: the heap holds bare floats (the cheapest objects to compare, one pointer away) and a
dict maps each time to its event, or to a first-in first-out list of the events sharing it.
A heap of (time, sequence, event) tuples costs about twice as much per pop.
"""

from __future__ import annotations

import heapq
from typing import Any


class EventQueue:
    __slots__ = ("_times", "_at")

    def __init__(self):
        self._times: list[float] = []
        self._at: dict[float, Any] = {}  # time -> (kind, payload), or a list of them (ties)

    def __len__(self) -> int:
        return len(self._times)

    def push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self._times, t)
        at = self._at
        prev = at.get(t)
        if prev is None:
            at[t] = (kind, payload)
        elif type(prev) is list:
            prev.append((kind, payload))
        else:
            at[t] = [prev, (kind, payload)]

    def pop(self) -> tuple[float, int, Any]:
        t = heapq.heappop(self._times)
        event = self._at.pop(t)
        if type(event) is list:
            first = event.pop(0)
            if event:
                self._at[t] = event if len(event) > 1 else event[0]
            event = first
        return t, event[0], event[1]
