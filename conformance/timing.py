"""Where the time of a check goes: subject, reference, oracle, the check run's components (the rest is harness)."""

from __future__ import annotations

import time
from collections import Counter


class PhaseTimer:
    """``with timer("subject"): ...`` adds the block's seconds to that phase (a plain context manager: a
    check enters three for each case, and a generator-based one costs several times as much)."""

    def __init__(self) -> None:
        self.seconds: Counter[str] = Counter()

    def __call__(self, phase: str) -> _Phase:
        return _Phase(self.seconds, phase)


class _Phase:
    __slots__ = ("phase", "seconds", "start")

    def __init__(self, seconds: Counter[str], phase: str) -> None:
        self.seconds, self.phase = seconds, phase

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exception: object) -> None:
        self.seconds[self.phase] += time.perf_counter() - self.start


UNTIMED = PhaseTimer()
"""Used when nobody asked for timings; its totals are never read."""
