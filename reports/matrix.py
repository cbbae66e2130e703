"""The subject × check matrix of a run, as Markdown: ``python -m reports.matrix results/conformance.json``.

One table per subject; a row per test module and check, a column per dtype. A cell lists the
statuses of that check's parametrizations (quantization modes, error-parity scenarios), most
severe first.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from foundation.schema import CheckRecord, Status
from reports.results import (
    NO_SUBJECT,
    Results,
    ResultsError,
    dtypes_in,
    load,
    module_check,
    most_severe_first,
    short_status,
    subject_label,
)


def cells(checks: list[CheckRecord]) -> dict[str, dict[str, dict[str, set[Status]]]]:
    """subject -> row (module:check) -> dtype -> the statuses of its parametrizations."""
    table: dict[str, dict[str, dict[str, set[Status]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(set)))
    for check in checks:
        if check.subject != NO_SUBJECT:
            table[subject_label(check)][module_check(check.check_id, check.check)][check.dtype].add(check.status)
    return table


def _cell(statuses: set[Status]) -> str:
    return " / ".join(short_status(s) for s in most_severe_first(statuses)) or "–"


def render(results: Results) -> str:
    table = cells(results.checks)
    dtypes = dtypes_in(results.checks)
    lines = []
    for subject in sorted(table):
        lines += [f"**{subject}**", "", f"| module:check | {' | '.join(dtypes)} |", "|---" * (len(dtypes) + 1) + "|"]
        for row, by_dtype in sorted(table[subject].items()):
            lines.append(f"| {row} | " + " | ".join(_cell(by_dtype.get(d, set())) for d in dtypes) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.matrix", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="results files written by pytest conformance")
    args = parser.parse_args(argv)
    try:
        print(render(load(args.results)))
    except ResultsError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
