"""A study's cases seen as check runs: the check run's verdict (`foundation.systematic`) over runs of the ci
profile's size, and over all of a study's cases at once.

For each check, a study's consecutive passing cases are cut into runs of as many cases as the ``ci`` profile draws
for that check's test (a chunk's last, shorter run is left out). For each quantity, term and adapter dtype, every run
gives its pooled statistic (a false alarm above `systematic.THRESHOLD`, or where its worst case lies beyond
`systematic.case_threshold`: `largest_case_ratio` is the largest of those over its threshold) and the smallest
relative error of the term it would have caught (`Pooled.detectable`); the study publishes the largest statistic, the
false alarms, the largest statistic of the runs no known divergence explains, and the 99th percentile of the
detectable error (an error of that size is caught in 99% of ci runs).
All of the study's cases pooled at once (`whole`) hold the model to a far finer scale than any run does.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from conformance import check_run
from foundation import systematic

Key = tuple[str, str, str]
"""(quantity, term, adapter dtype)."""


@dataclass
class CheckRuns:
    """One check's runs within one chunk, and its whole-study sums."""

    size: int
    """Cases per run: the ci profile's examples of the check's test."""
    current: dict[Key, systematic.Sums] = field(default_factory=lambda: defaultdict(systematic.Sums))
    in_current: int = 0
    runs: dict[Key, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    """Per key, each finished run's (statistic, detectable relative error, its worst case's statistic over that
    case's threshold, whether a known divergence explains it)."""
    whole: dict[Key, systematic.Sums] = field(default_factory=lambda: defaultdict(systematic.Sums))
    worst: dict[Key, tuple[float, dict]] = field(default_factory=dict)
    """Per key, the case whose own statistic is the largest, with it: what a false alarm's replay runs."""
    entries: set = field(default_factory=set)
    """The known divergences of the current run's cases: a run beyond the threshold that one of them explains (a
    ``systematic`` entry: MLX's own quantized product, which a correct layer on a quantized base calls) is counted
    as that, not as a false alarm, as the suite counts it."""

    def add(
        self, case: dict, components: list[systematic.Component], skipped: set[str], entries: Sequence = ()
    ) -> None:
        """One passing case's components (but for quantities in `skipped`: a formula the layer differs in), and the
        known divergences of the suite's test that draws it, which may explain its run's verdict."""
        self.entries.update(entries)
        for component in components:
            if component.quantity in skipped:
                continue
            key = systematic.stratum(case, component)
            self.current[key].add(component)
            self.whole[key].add(component)
            if component.statistic > self.worst.get(key, (0.0, None))[0]:
                self.worst[key] = (component.statistic, case)
        self.in_current += 1
        if self.in_current == self.size:
            for key, sums in self.current.items():
                pooled = sums.pooled(*key)
                if pooled is not None:
                    worst_case = pooled.worst_case / systematic.case_threshold(self.size)
                    beyond = pooled.statistic > systematic.THRESHOLD or worst_case > 1
                    explained = beyond and any(
                        entry.explanation.explains(check_run.failing(pooled), []) for entry in self.entries
                    )
                    self.runs[key].append((pooled.statistic, pooled.detectable, worst_case, explained))
            self.current, self.in_current, self.entries = defaultdict(systematic.Sums), 0, set()

    def finished(self) -> dict:
        """What a chunk hands back: the finished runs and the whole sums (plain values, to cross processes)."""
        return {
            "size": self.size,
            "runs": {"|".join(key): runs for key, runs in self.runs.items()},
            "whole": {"|".join(key): vars(sums) for key, sums in self.whole.items()},
            "worst": {"|".join(key): worst for key, worst in self.worst.items()},
        }


def merge(chunks: list[dict]) -> dict:
    """The chunks' runs of one check as one summary per quantity, term and adapter dtype."""
    runs: dict[str, list] = defaultdict(list)
    whole: dict[str, systematic.Sums] = defaultdict(systematic.Sums)
    worst: dict[str, tuple[float, dict]] = {}
    for chunk in chunks:
        for key, found in chunk["runs"].items():
            runs[key] += found
        for key, (statistic, case) in chunk.get("worst", {}).items():
            if statistic > worst.get(key, (0.0, None))[0]:
                worst[key] = (statistic, case)
        for key, sums in chunk["whole"].items():
            whole[key] = whole[key].merged(systematic.Sums(**sums))
    summary = {}
    for key in sorted(set(runs) | set(whole)):
        statistics = np.array([r[0] for r in runs[key]])
        detectable = np.array([r[1] for r in runs[key]])
        worst_cases = np.array([r[2] for r in runs[key]])
        explained = np.array([bool(r[3]) if len(r) > 3 else False for r in runs[key]], dtype=bool)
        pooled = whole[key].pooled(*key.split("|"))
        summary[key] = {
            "runs": len(statistics),
            "largest_statistic": float(statistics.max()) if len(statistics) else None,
            "largest_unexplained_statistic": float(statistics[~explained].max(initial=0.0))
            if len(statistics)
            else None,
            "largest_case_ratio": float(worst_cases.max()) if len(worst_cases) else None,
            "false_alarms": int(np.sum(((statistics > systematic.THRESHOLD) | (worst_cases > 1)) & ~explained)),
            "known_divergences": int(np.sum(explained)),
            "detectable_q99": float(np.quantile(detectable, 0.99, method="higher")) if len(detectable) else None,
            "detectable_median": float(np.quantile(detectable, 0.5, method="higher")) if len(detectable) else None,
            "whole": None if pooled is None else pooled.to_json() | {"detectable": pooled.detectable},
            "worst_case": None if key not in worst else {"statistic": worst[key][0], "case": worst[key][1]},
        }
    return {"size": chunks[0]["size"] if chunks else 0, "threshold": systematic.THRESHOLD, "terms": summary}
