"""Where a step's time goes: self time per named phase (``records.csv``'s ``t_*`` columns).

A phase entered inside another (the inner products streamed from within the backward) counts
for itself only: its time is taken out of the enclosing phase, so the phases of a step add up to
the time spent inside them. Wall-clock time: on an accelerator, a phase's time is that of the work
it launched and waited for, not of every kernel queued in it.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

PHASES = ("forward", "backward", "effects", "conflicts", "pairs", "tokens", "probe", "optimizer")


class Phases:
    """Accumulates self time per phase; ``with phases("backward"): …``."""

    def __init__(self):
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self._stack: list[list] = []            # [name, time spent in nested phases]

    @contextmanager
    def __call__(self, name: str):
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}; phases: {', '.join(PHASES)}")
        t0 = time.perf_counter()
        self._stack.append([name, 0.0])
        try:
            yield
        finally:
            _, nested = self._stack.pop()
            spent = time.perf_counter() - t0
            self.seconds[name] += spent - nested
            if self._stack:
                self._stack[-1][1] += spent
