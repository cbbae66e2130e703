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
from reports.regression import RAN, Comparison, compare
from reports.repro import replay_command
from reports.results import Results, ResultsError, load, subject_label
from reports.root_causes import RootCause, root_causes

LISTED = 40
"""Checks (or root causes) named one by one on the console per section; the summary and the report have them all."""


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
    new = comparison.new_failures
    causes = root_causes(new, failing_rows)
    verdict = f"{len(new)} new failure(s){against}, {len(causes)} root cause(s)" if new else f"no new failure{against}"
    lines = [f"gate: {verdict}"]
    lines += _cause_lines("root cause", causes)
    old = comparison.failing_in_base_too
    if old:
        old_causes = root_causes(old, failing_rows)
        lines.append(
            f"gate: failing in the base too, not counted: {len(old)} check(s), {len(old_causes)} root cause(s)"
        )
        lines += _cause_lines("root cause (failing in the base too)", old_causes)
    for title, checks in (
        ("fixed since the base", comparison.fixed),
        ("ran in the base, not provided now", comparison.no_longer_provided),
    ):
        if checks:
            lines.append(f"gate: {title}: {len(checks)}")
        lines += [f"  {check.check_id}: {subject_label(check)}" for check in checks[:LISTED]]
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


def _cause_lines(title: str, causes: list[RootCause]) -> list[str]:
    """Each root cause: its subject and cause, the checks it fails, the case that shows it and its replay."""
    lines = []
    for number, cause in enumerate(causes[:LISTED], 1):
        lines.append(f"gate: {title} {number} of {len(causes)}: {cause.subject}: {cause.cause}")
        lines.append(f"  fails {len(cause.checks)} check(s): {'; '.join(cause.check_names())}")
        lines.append(f"  shown on {cause.representative.check_id}: {cause.diagnosis}")
        if cause.row is not None:
            lines.append(f"  replay: {replay_command(cause.representative, cause.row)}")
    if len(causes) > LISTED:
        lines.append(f"  …and {len(causes) - LISTED} more root causes (in the summary)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
