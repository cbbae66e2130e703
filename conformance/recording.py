"""Recording: every check of every case becomes a row (`foundation.schema.Row`); the run's results file holds them all.

Rows are kept in memory by each process. Under xdist a worker hands its rows to the controller
through ``workeroutput`` when it finishes, and only the controller writes the file, so the file is
complete and written once however many workers ran.
"""

from __future__ import annotations

import errno
import json
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from conformance.divergences import Judgement, KnownDivergence
from foundation import schema
from foundation.schema import CheckRecord, DivergenceRecord, Row, Status
from foundation.verdict import Measurement


@dataclass
class Recorder:
    meta: dict
    rows: list[Row] = field(default_factory=list)
    check_id: str = ""
    """The check (test item) running now, set by the plugin before each test."""
    entries: list[KnownDivergence] = field(default_factory=list)
    """The known divergences covering the check running now, set with `check_id`."""
    explained: dict[str, dict[int, int]] = field(default_factory=dict)
    """Per check id, how many failing comparisons each entry (by its line) explained."""
    first_row: int = 0
    """Where the rows of the check running now begin."""

    def __repr__(self) -> str:
        return f"Recorder({len(self.rows)} rows)"

    def _repr_pretty_(self, printer, cycle) -> None:  # how Hypothesis and IPython print it
        printer.text(repr(self))

    def record(self, measurement: Measurement, final: bool, judgement: Judgement | None = None) -> Row:
        """A row for the measurement; `judgement` says which of its failures known divergences explain."""
        worst = measurement.worst if measurement.comparisons else None
        failing = [c for c in measurement.comparisons if not c.passed]
        entries = [judgement.entry_of(c) if judgement else None for c in failing]
        for entry in filter(None, entries):
            tally = self.explained.setdefault(self.check_id, {})
            tally[entry.line] = tally.get(entry.line, 0) + 1
        row = Row(
            check_id=self.check_id,
            subject=measurement.subject,
            check=measurement.check,
            dtype=measurement.case.get("dtype"),
            case=measurement.case,
            verdict=Status.PASS if measurement.passed else Status.FAIL,
            margin=_finite_or_none(measurement.margin),
            max_error=_finite_or_none(worst.max_error) if worst else 0.0,
            allowed_error=_finite_or_none(worst.allowed_at_worst) if worst else 0.0,
            worst=worst.describe() if worst else "",
            failures=[c.describe() for c in failing],
            explained_by=[None if entry is None else str(entry) for entry in entries],
            hints=measurement.hints,
            judged_at=_subject_worst(measurement),
            final=final,
            versions=self.meta["versions"],
            device=self.meta["device"],
            components=[component.to_json() for component in measurement.components],
        )
        self.rows.append(row)
        return row


def _subject_worst(measurement: Measurement) -> dict | None:
    """Where the subject came closest to (or went furthest past) its allowed error: what a reproduction checks."""
    numeric = [c for c in measurement.comparisons if c.side == "subject" and c.problem is None and c.worst_index]
    if not numeric:
        return None
    worst = max(numeric, key=lambda c: c.margin)
    return {
        "quantity": worst.quantity,
        "index": [int(i) for i in worst.worst_index],
        "error": _finite_or_none(worst.max_error),
        "allowed": _finite_or_none(worst.allowed_at_worst),
    }


def _finite_or_none(value: float) -> float | None:
    return value if value == value and abs(value) != float("inf") else None


def run_meta(versions: dict[str, str | None], device: str, profile: str, seed: str, subjects: dict[str, dict]) -> dict:
    return {
        "versions": versions,
        "device": device,
        "subjects": subjects,
        "profile": profile,
        "seed": seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "started": now(),
    }


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_writable(path: Path) -> None:
    """Fail early, with the path in the message, if an output file cannot be written (leaving no empty file)."""
    blocking = next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise NotADirectoryError(errno.ENOTDIR, f"{blocking} is a file, not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    with path.open("a"):
        pass
    if not existed:
        path.unlink()


def write(
    path: Path, meta: dict, rows: list[Row], checks: list[CheckRecord], divergences: list[DivergenceRecord]
) -> dict:
    """Write the results file; returns its document, for the reports."""
    document = schema.document(meta, rows, checks, divergences)
    path.write_text(json.dumps(document, allow_nan=False))  # unindented: tens of megabytes, a third as fast indented
    return document
