"""Failures grouped by root cause: the failing checks of one subject that share one diagnosis.

A wrong scale fails a subject's forward, gradient, dropout and optimizer checks in every dtype and base; a reader
wants it once, with one case to look at, and the list of what it breaks. Checks group by subject and by what
their diagnoses say once the one case's numbers are left out: a recognised factor's reading (``r: the raw alpha is
used where alpha / r belongs``), an exception's message, else the diagnosis with its numbers masked.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass

from foundation.schema import CheckRecord, Row
from reports.results import DTYPE_ORDER, module_check, subject_label

_READING = re.compile(r"\(= ([^;)]*)")
_RAISED = re.compile(r"raised (\w+(?:Error|Exception)?: .*)")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")
_PATH = re.compile(r"\(/[^)]*\)")


def diagnosis(check: CheckRecord, row: Row | None) -> str:
    """Why a check failed, in one line: its failing case's hints, else its worst failing comparison (the one its
    observed and allowed error come from), else the error it raised."""
    if row is None:  # no recorded case: the check raised before measuring
        return (check.longrepr.strip().splitlines() or [""])[-1]
    if row.hints:
        return "; ".join(row.hints)
    return row.worst if row.worst in row.failures else (row.failures or [row.worst])[0]


def cause_of(text: str) -> str:
    """What a diagnosis says without one case's numbers: the grouping key, and a group's title."""
    reading = _READING.search(text)
    if reading:
        return f"the LoRA scale is off by a factor {reading.group(1)}"
    raised = _RAISED.search(text)
    if raised:
        return "raises " + _PATH.sub("", raised.group(1)).strip()
    return _NUMBER.sub("…", text)


@dataclass(frozen=True)
class RootCause:
    """Failing checks of one subject with one cause, and the case that shows it."""

    subject: str
    cause: str
    checks: tuple[CheckRecord, ...]
    representative: CheckRecord
    row: Row | None
    """The representative's failing case (Hypothesis' shrunk one where there is one)."""

    @property
    def diagnosis(self) -> str:
        return diagnosis(self.representative, self.row)

    def check_names(self) -> list[str]:
        """The checks, by test module and check, each with its parametrizations' dtypes (and bases)."""
        variants: dict[str, list[str]] = defaultdict(list)
        for check in self.checks:
            parameters = check.check_id.partition("[")[2].rstrip("]").split("-", 1)
            variant = parameters[1] if len(parameters) > 1 else check.dtype
            variants[module_check(check.check_id, check.check)].append(variant)
        return [f"{name} ({', '.join(found)})" for name, found in variants.items()]


def _representative(members: list[tuple[CheckRecord, Row | None]]) -> tuple[CheckRecord, Row | None]:
    """The member easiest to read: with a recorded case, shrunk, with a hint, in float32, on a float base."""

    def plainness(member: tuple[CheckRecord, Row | None]) -> tuple:
        check, row = member
        dtype = DTYPE_ORDER.index(check.dtype) if check.dtype in DTYPE_ORDER else len(DTYPE_ORDER)
        return (row is None, row is not None and not row.hints, row is not None and not row.final, dtype)

    return min(members, key=plainness)


def root_causes(checks: list[CheckRecord], failing_rows: dict[tuple[int, str], Row]) -> list[RootCause]:
    """The checks grouped by root cause, the largest group first (then in the checks' order)."""
    groups: dict[tuple[str, str], list[tuple[CheckRecord, Row | None]]] = defaultdict(list)
    for check in checks:
        row = failing_rows.get((check.run, check.check_id))
        groups[(subject_label(check), cause_of(diagnosis(check, row)))].append((check, row))
    causes = []
    for (subject, cause), members in groups.items():
        representative, row = _representative(members)
        causes.append(RootCause(subject, cause, tuple(c for c, _ in members), representative, row))
    return sorted(causes, key=lambda c: -len(c.checks))
