"""The results file's schema: its format version, the statuses of checks and known divergences, and its records.

The plugin writes a results file (`document`); reports, the gate and the studies read it back (`parse`) into the
same types, so every field has one name and one meaning. The file is JSON: a record's `to_json` is what is
written, its `from_json` reads that back, and a status is written as its value ("known divergence").
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
from dataclasses import dataclass, field
from typing import Any

FORMAT = 1
"""The version of the results file's layout; a reader refuses any other."""


class SchemaError(ValueError):
    """A results document whose records do not have this schema's fields."""


class Status(str, enum.Enum):
    """How a check, or a known-divergences entry, ended."""

    PASS = "pass"
    FAIL = "fail"
    KNOWN_DIVERGENCE = "known divergence"
    """Its entries explained every failing comparison, and each entry explained one."""
    NOW_PASSING = "now passing"
    """An entry explained no failure: the check fails, and the entry should go."""
    MISSED_THIS_RUN = "missed this run"
    """An @sometimes entry no case of this run reached."""
    NEVER_SEEN = "never seen"
    """An @sometimes entry no case of a thorough run reached: the run fails."""
    NOT_PROVIDED = "not provided"
    """The subject is not installed (the check was skipped, saying why)."""
    NOT_RUN = "not run"
    """An entry whose checks were not selected."""

    def __str__(self) -> str:
        return self.value


CHECK_SEVERITY = (
    Status.FAIL,
    Status.NOW_PASSING,
    Status.KNOWN_DIVERGENCE,
    Status.MISSED_THIS_RUN,
    Status.PASS,
    Status.NOT_PROVIDED,
)
"""A check's statuses, most severe first."""
ENTRY_SEVERITY = (
    Status.KNOWN_DIVERGENCE,
    Status.NOW_PASSING,
    Status.NEVER_SEEN,
    Status.MISSED_THIS_RUN,
    Status.NOT_PROVIDED,
    Status.NOT_RUN,
)
"""An entry's statuses, the one that says most first (where several runs merge)."""


@functools.cache
def _field_names(record: type) -> tuple[frozenset[str], frozenset[str]]:
    """A record type's fields, and those without a default (read once per type: a results file has many rows)."""
    fields = dataclasses.fields(record)
    required = {f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    return frozenset(f.name for f in fields), frozenset(required)


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Status) else value


class _Record:
    """What the records share: JSON out and in, and a run's `run` index and `label` kept out of the file."""

    _NOT_WRITTEN = ("run", "label")

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values (a status as its text): what the file holds and what execnet can send between processes."""
        return {
            f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in self._NOT_WRITTEN
        }

    @classmethod
    def from_json(cls, written: dict[str, Any], **extra: Any):
        """The record written as `written`; a `SchemaError` naming what is missing or unknown."""
        names, required = _field_names(cls)
        if not isinstance(written, dict) or required - set(written) - set(extra):
            missing = sorted(required - set(written) - set(extra)) if isinstance(written, dict) else ["everything"]
            raise SchemaError(f"a {cls.__name__} without {', '.join(missing)}")
        values = {k: v for k, v in written.items() if k in names}
        for name in ("status", "verdict"):
            if name in values:
                try:
                    values[name] = Status(values[name])
                except ValueError:
                    raise SchemaError(f"a {cls.__name__} with the unknown {name} {values[name]!r}") from None
        return cls(**values, **extra)


@dataclass(frozen=True)
class Row(_Record):
    """One check of one case: its verdict, the worst comparison, what failed and what explained each failure."""

    check_id: str
    subject: str
    check: str
    dtype: str | None
    case: dict[str, Any]
    """The case's parameters, as ``describe()`` gives them (enough to rebuild it)."""
    verdict: Status
    """`Status.PASS` or `Status.FAIL`."""
    margin: float | None
    """The worst observed error over its allowed error (None where not finite)."""
    max_error: float | None
    allowed_error: float | None
    worst: str
    """The worst comparison, described."""
    failures: list[str]
    """Each failing comparison, described."""
    explained_by: list[str | None]
    """For each failure, the known-divergences entry that explains it, or None."""
    hints: list[str]
    judged_at: dict[str, Any] | None
    """Where the subject came closest to its allowed error: quantity, index, error, allowed."""
    final: bool
    """Hypothesis' final (shrunk) example of a failing check."""
    versions: dict[str, str | None]
    device: str
    components: list[dict[str, Any]] = field(default_factory=list)
    """Where it passed: the subject's error along each term of each quantity (`foundation.systematic.Component`)."""
    run: int = 0
    """Where results merged: the index of the file the row came from."""
    label: str = ""
    """Where results of several configurations merged: what differs in this row's."""

    @property
    def failed(self) -> bool:
        return self.verdict == Status.FAIL


@dataclass(frozen=True)
class CheckRecord(_Record):
    """One test item: a check of a subject in a dtype, with its status over all its cases."""

    check_id: str
    subject: str
    dtype: str
    check: str
    status: Status
    explained: dict[str, int] = field(default_factory=dict)
    """Per known-divergences entry (its line, as text), how many failing comparisons it explained."""
    longrepr: str = ""
    """What a failure printed, or why the check was skipped."""
    systematic: list[dict[str, Any]] = field(default_factory=list)
    """Each quantity's error along each term of its formula, pooled over the check's passing cases
    (`foundation.systematic.Pooled`)."""
    judges_saved_adapters: bool = False
    """Whether the check judges the function a saved adapter file gives: a change of its verdict between a base and a
    change is a change of what such a file means (`reports.regression`)."""
    replay: str = ""
    """Where a case failed (a failure, or a known divergence): the command that replays the case shown for it
    (`showing_case`), by the Python that ran the suite."""
    run: int = 0
    label: str = ""


@dataclass(frozen=True)
class DivergenceRecord(_Record):
    """One entry of the known-divergences file and what it explained in this run."""

    check_id: str
    explains: str
    line: int
    reason: str
    status: Status
    explained: int
    """Failing comparisons it explained, over all its checks."""
    now_passing: list[str]
    """The checks it covers in which it explained nothing (empty for an @sometimes entry)."""
    label: str = ""


def replay_command(subject: str, check: str, case: dict, python: str = "python") -> str:
    """The suite's replay of one recorded case, run by `python` (one with this suite installed: the one that ran
    the suite, e.g. ``.tox/conformance/bin/python``)."""
    return f"{python} -m conformance.replay '{json.dumps({'subject': subject, 'check': check, 'case': case})}'"


def showing_case(rows: list[Row]) -> Row | None:
    """The failing case that shows a check's failure: Hypothesis' final, shrunk one, else the first."""
    failing = [row for row in rows if row.failed]
    return next((row for row in failing if row.final), failing[0] if failing else None)


def document(meta: dict, rows: list[Row], checks: list[CheckRecord], divergences: list[DivergenceRecord]) -> dict:
    """The results file's JSON document."""
    return {
        "format": FORMAT,
        "meta": meta,
        "checks": [c.to_json() for c in checks],
        "known_divergences": [d.to_json() for d in divergences],
        "rows": [r.to_json() for r in rows],
    }


PARTS = ("meta", "rows", "checks", "known_divergences")
"""What a results document holds besides its format."""


def parse(
    written: dict, run: int = 0, label: str = ""
) -> tuple[dict, list[Row], list[CheckRecord], list[DivergenceRecord]]:
    """A results document's parts as records (the document is assumed to be of `FORMAT`, with every part)."""
    return (
        written["meta"],
        [Row.from_json(r, run=run, label=label) for r in written["rows"]],
        [CheckRecord.from_json(c, run=run, label=label) for c in written["checks"]],
        [DivergenceRecord.from_json(d, label=label) for d in written["known_divergences"]],
    )
