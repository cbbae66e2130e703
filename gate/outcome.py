"""The gate's decision on a finished run: compare with the base, write the report and summary, say why.

Runs inside the environment under test (``python -m gate.outcome``), after the suite: it needs the
report's dependencies, which the gate's own python may not have. Exits 0, 1 or 3 as the gate does.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from foundation.schema import Status
from gate import NEW_FAILURE, PASSED, SETUP_FAILED
from reports import publish
from reports.markdown import diagnosis
from reports.regression import RAN, Comparison, compare
from reports.results import Results, ResultsError, load, subject_label

LISTED = 40
"""Checks named one by one on the console per section; the summary and the report have them all."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gate.outcome", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--baseline", type=Path, default=None, help="the base branch's results file")
    parser.add_argument("--html", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, required=True)
    parser.add_argument("--package", required=True)
    args = parser.parse_args(argv)
    try:
        results = load([args.results])
        base = load([args.baseline]) if args.baseline else None
    except ResultsError as error:
        print(f"gate: set-up failed: {error}")
        return SETUP_FAILED
    if not any(c.status in RAN for c in results.checks):
        version = results.runs[0]["versions"].get(args.package) or "(not installed)"
        print(
            f"gate: set-up failed: {args.package} {version} provides none of the subjects the suite knows: "
            "nothing was checked"
        )
        return SETUP_FAILED
    comparison = compare(results, base)
    publish.write(results, args.html, args.markdown, comparison)
    for line in console_lines(results, comparison):
        print(line)
    return PASSED if comparison.passed else NEW_FAILURE


def console_lines(results: Results, comparison: Comparison) -> list[str]:
    failing_rows = results.failing_case_by_check()
    against = " against the base" if comparison.base is not None else ""
    verdict = (
        f"{len(comparison.new_failures)} new failure(s){against}"
        if comparison.new_failures
        else f"no new failure{against}"
    )
    lines = [f"gate: {verdict}"]
    sections = [
        ("new failure", comparison.new_failures, True),
        ("failing in the base too, not counted", comparison.failing_in_base_too, True),
        ("fixed since the base", comparison.fixed, False),
        ("ran in the base, not provided now", comparison.no_longer_provided, False),
    ]
    for title, checks, diagnose in sections:
        if checks:
            lines.append(f"gate: {title}: {len(checks)}")
        for check in checks[:LISTED]:
            why = diagnosis(check, failing_rows.get((check.run, check.check_id))) if diagnose else subject_label(check)
            lines.append(f"  {check.check_id}: {why}")
        if len(checks) > LISTED:
            lines.append(f"  …and {len(checks) - LISTED} more (in the summary)")
    changed = comparison.saved_adapters_changed
    if changed:
        lines.append(
            f"gate: saved adapters change meaning: {len(changed)} check(s) of saved adapter files changed verdict "
            "against the base; an adapter saved with the base gives another function with this change (say so to "
            "users, or convert their files)"
        )
        lines += [f"  {c.check_id}: {'now fails' if c.status == Status.FAIL else 'now passes'}" for c in changed]
    for entry in comparison.now_passing_divergences:
        lines.append(f"gate: known divergence now passing, drop or narrow its entry: {entry.check_id}")
    known = [d for d in results.known_divergences if d.status == Status.KNOWN_DIVERGENCE]
    if known:
        lines.append(f"gate: known divergences seen (not failures): {len(known)}")
        lines += [f"  {d.check_id}: {d.reason}" for d in known]
    return lines


if __name__ == "__main__":
    sys.exit(main())
