"""Recording a measurement, then asserting it with a message that diagnoses rather than just reports."""

from __future__ import annotations

import sys

from hypothesis.control import current_build_context, currently_in_test_context

from conformance import divergences
from conformance.divergences import Judgement
from conformance.families import replayable
from conformance.recording import Recorder
from foundation.schema import Row, replay_command
from foundation.verdict import Measurement


def message(measurement: Measurement, check_id: str = "", judgement: Judgement | None = None) -> str:
    """What failed, what agreed, the diagnosis and a replay; with `judgement` (of a check that known divergences
    cover), which failures they explain (listed after those none explains)."""
    case = " ".join(f"{k}={v}" for k, v in measurement.case.items())
    where = f" [{check_id}]" if check_id else ""
    lines = [f"{measurement.subject} {measurement.check}: disagrees beyond what rounding explains{where}"]
    lines.append(f"  case: {case}")
    failing = [c for c in measurement.comparisons if not c.passed]
    explained = {id(c): entry for c, entry in judgement.explained} if judgement else {}
    if judgement is not None:
        lines.append("  not explained by any known divergence:")
    lines += [f"  {c.describe()}" for c in failing if id(c) not in explained]
    lines += [
        f"  {c.describe()}  [known divergence, line {explained[id(c)].line}: {explained[id(c)].reason}]"
        for c in failing
        if id(c) in explained
    ]
    agreeing = sorted({c.what for c in measurement.comparisons if c.passed})
    if agreeing:
        lines.append(f"  within the allowed error: {', '.join(agreeing)}")
    lines += [f"  diagnosis: {hint}" for hint in measurement.hints]
    replay = replay_of(measurement.subject, measurement.check, measurement.case, check_id)
    if replay:
        lines.append(f"  replay: {replay}")
    return "\n".join(lines)


def replay_of(subject: str, check: str, case: dict, check_id: str = "") -> str:
    """How to run one case again: the suite's replay, by this Python (which has the suite installed), for a check
    it can replay alone; else the test, with pytest."""
    if replayable(check):
        return replay_command(subject, check, case, sys.executable)
    return f"pytest 'conformance/{check_id}'" if check_id else ""


def row_replay(row: Row | None) -> str:
    """`replay_of` a recorded case (empty without one)."""
    return replay_of(row.subject, row.check, row.case, row.check_id) if row is not None else ""


def record_and_assert(recorder: Recorder, measurement: Measurement) -> None:
    """Record the row (marking Hypothesis' final, shrunk replay; a check outside Hypothesis is final), then
    fail if the check failed in a way no known divergence covering it explains."""
    __tracebackhide__ = True  # a failure's traceback ends in the test that asserted
    final = current_build_context().is_final if currently_in_test_context() else True
    judgement = divergences.judge(measurement, recorder.entries)
    if not judgement.passed:
        measurement.diagnose_fully()
    recorder.record(measurement, final=final, judgement=judgement)
    assert judgement.passed, message(measurement, recorder.check_id, judgement if recorder.entries else None)
