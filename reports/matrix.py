"""The subject × check matrix of a run, as Markdown: ``python -m reports.matrix results/conformance.json``.

One table per subject; a row per test module and check, a column per dtype. A cell lists the
statuses of that check's parametrizations (quantization modes, error-parity scenarios), most
severe first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

SEVERITY = ("fail", "now passing", "known divergence", "missed this run", "pass", "not provided")
SHORT = {"known divergence": "known div."}
NO_SUBJECT = "None"


def _row_name(check: dict) -> str:
    module, _, test = check["check_id"].partition("::")
    return f"{module.removeprefix('test_').removesuffix('.py')}:{check['check']}"


def cells(checks: list[dict]) -> dict[str, dict[str, dict[str, set[str]]]]:
    """subject -> row (module:check) -> dtype -> the statuses of its parametrizations."""
    table: dict[str, dict[str, dict[str, set[str]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(set)))
    for check in checks:
        table[check["subject"]][_row_name(check)][check["dtype"]].add(check["status"])
    return table


def _cell(statuses: set[str]) -> str:
    ordered = [s for s in SEVERITY if s in statuses] + sorted(statuses - set(SEVERITY))
    return " / ".join(SHORT.get(s, s) for s in ordered) or "–"


def render(results: dict) -> str:
    table = cells(results["checks"])
    dtypes = sorted({c["dtype"] for c in results["checks"] if c["dtype"] != NO_SUBJECT}, key=["float32", "float16", "bfloat16"].index)
    lines = []
    for subject in sorted(s for s in table if s != NO_SUBJECT):
        lines += [f"**{subject}**", "", f"| module:check | {' | '.join(dtypes)} |", "|---" * (len(dtypes) + 1) + "|"]
        for row, by_dtype in sorted(table[subject].items()):
            lines.append(f"| {row} | " + " | ".join(_cell(by_dtype.get(d, set())) for d in dtypes) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reports.matrix", description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results file written by pytest conformance")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
        print(render(results))
    except (OSError, ValueError, KeyError) as error:
        parser.error(f"cannot read {args.results}: {error}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
