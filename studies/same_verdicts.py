"""Whether two runs decided the same: ``python -m studies.same_verdicts BEFORE.json AFTER.json``.

For a change that must change no verdict (a refactoring, a speed-up): every check id has the same status
in both results files, and every case (a row, by its check id and its parameters) the same verdict. Prints
what differs and exits 1 if anything does, 0 if nothing does; margins that moved are counted apart (some of
torch's CPU gradients are not bit-reproducible, see the flakiness study).

A change can move which cases a derandomized run draws without changing any judgement: Hypothesis seeds a
test from its source and group (`conformance.scheduling`), and now and then draws a constant it found in the
project's own modules. With ``--rejudge`` only BEFORE is read: each of its cases is judged again by this
checkout's check, and the verdicts and margins compared (the checks replay cannot rebuild, error parity and the
base's own kernel, are counted apart).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from conformance import threads
from reports.results import NO_SUBJECT, Results, ResultsError, load


def _cases(results: Results) -> Counter:
    """Each row as (check id, case, verdict), counted: a case may be drawn more than once."""
    return Counter((row.check_id, json.dumps(row.case, sort_keys=True), str(row.verdict)) for row in results.rows)


def moved_margins(before: Results, after: Results) -> int:
    """How many cases judged in both runs have a different margin."""
    margins = [{} for _ in (before, after)]
    for found, run in zip(margins, (before, after)):
        for row in run.rows:
            found.setdefault((row.check_id, json.dumps(row.case, sort_keys=True)), []).append(row.margin)
    both = set(margins[0]) & set(margins[1])
    return sum(sorted(margins[0][key], key=str) != sorted(margins[1][key], key=str) for key in both)


def differences(before: Results, after: Results) -> list[str]:
    """What the two runs decided differently, one line each (empty when they agree)."""
    found = []
    statuses = [{c.check_id: str(c.status) for c in run.checks} for run in (before, after)]
    for check_id in sorted(set(statuses[0]) | set(statuses[1])):
        was, now = (s.get(check_id, "absent") for s in statuses)
        if was != now:
            found.append(f"check {check_id}: {was} before, {now} after")
    cases = [_cases(run) for run in (before, after)]
    for (check_id, case, verdict), count in sorted((cases[0] - cases[1]).items()):
        found.append(f"case only before ({count}×): {check_id} {verdict} {case}")
    for (check_id, case, verdict), count in sorted((cases[1] - cases[0]).items()):
        found.append(f"case only after ({count}×): {check_id} {verdict} {case}")
    return found


def rejudged(before: Results) -> tuple[list[str], int, int]:
    """Each case of `before` judged again by this checkout's checks: the differing verdicts, how many cases were
    judged again and how many margins moved."""
    from conformance.families import find_check
    from foundation.rebuild import case_from_description
    from subjects.known import resolve

    found, judged, moved = [], 0, 0
    subjects = {}
    for row in before.rows:
        if row.subject == NO_SUBJECT:  # a property of MLX itself (its quantized product), judged on fixed inputs
            continue
        if row.subject not in subjects:
            subjects[row.subject] = resolve(row.subject)
        subject = subjects[row.subject]
        check = find_check(subject.family, row.check)
        if check is None:
            continue
        measurement = check.run(subject, case_from_description(row.case))
        judged += 1
        verdict = "pass" if measurement.passed else "fail"
        margin = measurement.margin if measurement.margin == measurement.margin else None
        if verdict != str(row.verdict):
            found.append(
                f"case {row.check_id}: {row.verdict} before, {verdict} now {json.dumps(row.case, sort_keys=True)}"
            )
        elif row.margin is not None and margin != row.margin:
            moved += 1
    return found, judged, moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.same_verdicts", description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path, nargs="?", help="the results of the change (not with --rejudge)")
    parser.add_argument("--rejudge", action="store_true", help="judge BEFORE's cases again with this checkout")
    threads.add_option(parser)
    args = parser.parse_args(argv)
    threads.apply_option(parser, args)
    if args.rejudge == (args.after is not None):
        parser.error("give AFTER, or --rejudge, not both")
    try:
        before = load([args.before])
        after = None if args.rejudge else load([args.after])
    except ResultsError as error:
        parser.error(str(error))
    if after is None:
        found, judged, moved = rejudged(before)
        for line in found:
            print(line)
        print(
            f"{len(before.rows)} cases, {judged} judged again: "
            + (f"{len(found)} verdicts differ" if found else "the same verdict for every one")
            + f"; {moved} margins moved; {len(before.rows) - judged} not replayable (error parity, the base's kernel)"
        )
        return 1 if found else 0
    found = differences(before, after)
    for line in found:
        print(line)
    print(
        f"{len(before.checks)} and {len(after.checks)} checks, {len(before.rows)} and {len(after.rows)} cases: "
        + (
            f"{len(found)} differences"
            if found
            else "the same status for every check and the same verdict for every case"
        )
        + f"; {moved_margins(before, after)} cases' margins moved"
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
