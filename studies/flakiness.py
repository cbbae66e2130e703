"""Flakiness: run the ``ci`` profile again and again on correct subjects; every run must judge alike.

``python -m studies.flakiness [--runs 20] [--subject PATTERN ...] [--workers 2] [--out FILE]``

Each run is a separate ``pytest conformance --hypothesis-profile ci`` process (on `--workers` xdist
workers, as CI runs it). Two runs agree when they judged the same cases (check id and case
parameters) with the same verdicts, gave every check the same status and ended alike. Margins that
move between runs are counted apart (`margin_drift`): they show arithmetic that is not reproducible.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from conformance import threads
from reports.results import Results, load
from studies import sampling

RESULTS = Path(__file__).with_name("results")
ROOT = Path(__file__).resolve().parent.parent


def default_subjects() -> list[str]:
    """The correct layers of ``catalogue/layers.py``: every check of theirs passes."""
    from catalogue import CORRECT

    return [subject.name for subject in CORRECT]


def fingerprint(results: Results) -> dict:
    """What a run decided: each check's status, and each judged case's verdict (its margin aside)."""
    return {
        "checks": sorted((c.check_id, str(c.status)) for c in results.checks),
        "rows": sorted((r.check_id, json.dumps(r.case, sort_keys=True), str(r.verdict)) for r in results.rows),
    }


def margins(results: Results) -> dict[tuple[str, str], float | None]:
    """Each judged case's margin, by check and case."""
    return {(r.check_id, json.dumps(r.case, sort_keys=True)): r.margin for r in results.rows}


def differences(first: dict, other: dict) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they agree)."""
    found = []
    for part in ("checks", "rows"):
        only_first, only_other = set(first[part]) - set(other[part]), set(other[part]) - set(first[part])
        found += [f"{part}: only in the first run: {item}" for item in sorted(only_first)[:3]]
        found += [f"{part}: only in this run: {item}" for item in sorted(only_other)[:3]]
    return found


def _change(first: float | None, other: float | None) -> float:
    """How far a margin moved (0 if it did not; NaN and None equal themselves)."""
    if first == other or (first != first and other != other):
        return 0.0
    if first is None or other is None or first != first or other != other:
        return float("inf")
    return abs(other - first)


def margin_drift(first: dict[tuple[str, str], float], other: dict[tuple[str, str], float]) -> dict:
    """Cases judged in both runs whose margins differ: how many, the largest change, the highest margin among them.

    A margin that moves between runs of the same case means some implementation's arithmetic is not
    reproducible (a parallel sum's order); the verdict is at risk only where such a margin nears 1."""
    moved = [(change, key) for key, margin in first.items() if key in other and (change := _change(margin, other[key]))]
    if not moved:
        return {"cases": 0, "largest": None, "highest_margin": None}
    change, (check_id, case) = max(moved)
    highest = max(
        (m for _, key in moved for m in (first[key], other[key]) if isinstance(m, float) and m == m), default=None
    )
    return {
        "cases": len(moved),
        "highest_margin": highest,
        "largest": {
            "check_id": check_id,
            "case": json.loads(case),
            "first": first[(check_id, case)],
            "this": other[(check_id, case)],
            "change": change,
        },
    }


def run_once(subjects: list[str], workers: int, results: Path) -> tuple[int, float]:
    command = [
        sys.executable,
        "-m",
        "pytest",
        "conformance",
        "--hypothesis-profile",
        "ci",
        "-p",
        "no:cacheprovider",
        "-q",
        "--results",
        str(results),
        "--report",
        "none",
        *(f"--subject={s}" for s in subjects),
    ]
    if workers > 1:
        command += ["-n", str(workers)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    completed = subprocess.run(command, check=False, cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode not in (0, 1):
        raise SystemExit(
            f"pytest ended with {completed.returncode}:\n{completed.stdout[-2000:]}{completed.stderr[-2000:]}"
        )
    return completed.returncode, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.flakiness", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="(default: %(default)s)")
    parser.add_argument(
        "--subject",
        action="append",
        default=[],
        help="subject or pattern (repeatable; default: the correct layers of tests/)",
    )
    parser.add_argument("--workers", type=int, default=2, help="xdist workers per run (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "flakiness.json", help="(default: %(default)s)")
    threads.add_option(parser)
    args = parser.parse_args(argv)
    threads.apply_option(parser, args)  # its pytest runs inherit the policy (CONFORMANCE_THREADS)
    if args.runs < 2:
        parser.error(f"--runs {args.runs}: at least 2 (a run has nothing to agree with but another)")
    sampling.writable(parser, args.out)
    subjects = args.subject or default_subjects()
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for index in range(args.runs):
            path = Path(folder) / f"run-{index}.json"
            code, seconds = run_once(subjects, args.workers, path)
            results = load([path])
            print_, margins_ = fingerprint(results), margins(results)
            if index == 0:
                first, first_margins = print_, margins_
            found, drift = differences(first, print_), margin_drift(first_margins, margins_)
            statuses: dict[str, int] = {}
            for _, status in print_["checks"]:
                statuses[status] = statuses.get(status, 0) + 1
            runs.append(
                {
                    "exit": code,
                    "seconds": round(seconds, 1),
                    "cases_judged": len(print_["rows"]),
                    "statuses": statuses,
                    "differences": found,
                    "margin_drift": drift,
                }
            )
            moved = f"; {drift['cases']} margins moved" if drift["cases"] else ""
            print(
                f"run {index + 1}/{args.runs}: exit {code}, {len(print_['rows'])} judged cases, {statuses}, "
                f"{'same verdicts as run 1' if not found else 'DIFFERS: ' + found[0]}{moved} ({seconds:.0f} s)",
                flush=True,
            )
    identical = all(not run["differences"] for run in runs) and len({run["exit"] for run in runs}) == 1
    command = f"python -m studies.flakiness --runs {args.runs} --workers {args.workers}" + "".join(
        f" --subject '{s}'" for s in subjects
    )
    document = {
        "study": "flakiness",
        "measured": date.today().isoformat(),
        "environment": sampling.environment(),
        "command": command,
        "subjects": subjects,
        "identical": identical,
        "runs": runs,
    }
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"{args.runs} runs: {'identical verdicts' if identical else 'VERDICTS DIFFER'}; wrote {args.out}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
