"""Replay one failing case: ``python -m conformance.replay '<json from the failure message>'``.

The JSON names the subject, the check and the case's parameters (the arrays are rebuilt from the
seed), so a failure can be reproduced without Hypothesis and without pytest.
"""

from __future__ import annotations

import argparse
import json
import sys

from conformance import threads
from conformance.asserting import message
from conformance.families import find_check
from foundation.rebuild import case_from_description
from subjects.known import resolve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.replay", description=__doc__.splitlines()[0])
    parser.add_argument("replay", help="the JSON after 'replay:' in a failure message")
    threads.add_option(parser)
    args = parser.parse_args(argv)
    threads.apply_option(parser, args)
    try:
        spec = json.loads(args.replay)
        subject = resolve(spec["subject"])
        check = find_check(subject.family, spec["check"])
        if check is None:
            raise LookupError(f"{subject} has no check {spec['check']!r}")
        if check.not_provided_reason(subject):
            raise LookupError(check.not_provided_reason(subject))
        case = case_from_description(spec["case"])
        if not check.applies(case):
            raise ValueError(
                f"{spec['check']} does not judge this case (its test module leaves it out: see "
                "CheckInfo.judges in conformance/families.py)"
            )
    except (ValueError, KeyError, LookupError) as error:
        parser.error(f"cannot replay: {error}")
    measurement = check.run(subject, case)
    if measurement.passed:
        print(f"{subject} {spec['check']}: passes (margin {measurement.margin:.3g})")
        return 0
    measurement.diagnose_fully()
    print(message(measurement))
    return 1


if __name__ == "__main__":
    sys.exit(main())
