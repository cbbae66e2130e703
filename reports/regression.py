"""Regression mode: what a run changes against the results of the base branch.

A gate on a pull request must fail on what the pull request breaks, not on what was already broken:
a check fails *newly* when it fails now and did not fail in the base (or did not exist there).
Checks that fail in both are listed, not counted against the change. Checks that failed in the base
and pass now are *fixed*, and a known divergence whose checks all pass now asks for its entry to be
dropped. A check that ran in the base and is *not provided* now (a class that moved or went away)
is reported too, so a subject cannot leave the gate unnoticed.

Checks are matched by check id (test module, check, subject and dtype); with the derandomized
``ci`` profile the base and the change are judged on the same cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from foundation.schema import CheckRecord, DivergenceRecord, Status
from reports.results import Results, most_severe_first

RAN = (Status.FAIL, Status.NOW_PASSING, Status.KNOWN_DIVERGENCE, Status.MISSED_THIS_RUN, Status.PASS)


@dataclass
class Comparison:
    new_failures: list[CheckRecord]
    """Checks of this run that fail and did not fail in the base (all failing checks without a base)."""
    failing_in_base_too: list[CheckRecord] = field(default_factory=list)
    fixed: list[CheckRecord] = field(default_factory=list)
    """Checks of this run that pass and failed in the base."""
    no_longer_provided: list[CheckRecord] = field(default_factory=list)
    """Checks of this run that are not provided and ran in the base."""
    now_passing_divergences: list[DivergenceRecord] = field(default_factory=list)
    """Known-divergence entries none of whose checks diverges any more: their entries should go."""
    base: Results | None = None

    @property
    def saved_adapters_changed(self) -> list[CheckRecord]:
        """The checks of saved adapter files whose verdict changed against the base (`CheckRecord.
        judges_saved_adapters`). Each verdict holds the function a file gives to the allowed error around peft's
        meaning of it (`foundation.model_verdict`), so where one side passes and the other fails, the same file gives
        the two sides different functions: adapters saved with the base mean something else with this change,
        whichever side is right."""
        if self.base is None:
            return []
        return [c for c in [*self.new_failures, *self.fixed] if c.judges_saved_adapters]

    @property
    def passed(self) -> bool:
        return not self.new_failures


def base_statuses(base: Results) -> dict[str, Status]:
    """Each check id's status in the base; the most severe one where the base merges several files."""
    statuses: dict[str, set[Status]] = {}
    for check in base.checks:
        statuses.setdefault(check.check_id, set()).add(check.status)
    return {check_id: most_severe_first(found)[0] for check_id, found in statuses.items()}


def compare(results: Results, base: Results | None = None) -> Comparison:
    now_passing = [d for d in results.known_divergences if d.status in (Status.NOW_PASSING, Status.NEVER_SEEN)]
    failing = [c for c in results.checks if c.status == Status.FAIL]
    if base is None:
        return Comparison(new_failures=failing, now_passing_divergences=now_passing)
    before = base_statuses(base)
    return Comparison(
        new_failures=[c for c in failing if before.get(c.check_id) != Status.FAIL],
        failing_in_base_too=[c for c in failing if before.get(c.check_id) == Status.FAIL],
        fixed=[c for c in results.checks if c.status == Status.PASS and before.get(c.check_id) == Status.FAIL],
        no_longer_provided=[
            c for c in results.checks if c.status == Status.NOT_PROVIDED and before.get(c.check_id) in RAN
        ],
        now_passing_divergences=now_passing,
        base=base,
    )
