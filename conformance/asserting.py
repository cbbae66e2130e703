"""Recording a measurement, then asserting it with a message that diagnoses rather than just reports."""

from __future__ import annotations

import json

from hypothesis.control import current_build_context, currently_in_test_context

from conformance.recording import Recorder
from conformance.registry import replayable
from conformance.verdict import Measurement


def message(measurement: Measurement, check_id: str = "") -> str:
    case = " ".join(f"{k}={v}" for k, v in measurement.case.items())
    where = f" [{check_id}]" if check_id else ""
    lines = [f"{measurement.subject} {measurement.check}: disagrees beyond what rounding explains{where}"]
    lines.append(f"  case: {case}")
    lines += [f"  {c.describe()}" for c in measurement.comparisons if not c.passed]
    agreeing = sorted({f"{c.side} {c.quantity}" for c in measurement.comparisons if c.passed})
    if agreeing:
        lines.append(f"  within the allowed error: {', '.join(agreeing)}")
    lines += [f"  diagnosis: {hint}" for hint in measurement.hints]
    if replayable(measurement.check):
        replay = json.dumps({"subject": measurement.subject, "check": measurement.check, "case": measurement.case})
        lines.append(f"  replay: python -m conformance.replay '{replay}'")
    elif check_id:
        lines.append(f"  replay: pytest 'conformance/{check_id}'")
    return "\n".join(lines)


def record_and_assert(recorder: Recorder, measurement: Measurement) -> None:
    """Record the row (marking Hypothesis' final, shrunk replay; a check outside Hypothesis is final), then
    fail if the check failed."""
    final = current_build_context().is_final if currently_in_test_context() else True
    recorder.record(measurement, final=final)
    assert measurement.passed, message(measurement, recorder.check_id)
