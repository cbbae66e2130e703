"""Catch rates: in how many seeds the suite catches each wrong variant of ``catalogue/layers.py``.

``python -m studies.catch_rates [--seeds 100] [--examples N] [--variant NAME ...] [--workers N] [--out FILE]``

A seed stands for one run of the suite: Hypothesis, under that seed, draws as many cases for the
variant's check as the ``ci`` profile gives that check's test in its module (`ci_examples`: 150, or
the fraction the module's ``profiles.fewer_examples`` leaves, e.g. 15 per quantization mode), or
`--examples` if given, as the module draws them; the seed catches the variant if any of them
fails. Every dtype in which the bug is visible counts separately, and on a quantized base every mode.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from conformance import threads
from studies import sampling

RESULTS = Path(__file__).with_name("results")
REQUIRED = 0.99


class _Caught(Exception):
    pass


def _check_of(name: str, kind: str | None):
    """The variant's family's description of its base, and of its check there."""
    from catalogue import WRONG_VARIANTS
    from conformance.families import FAMILIES

    variant = WRONG_VARIANTS[name]
    base = FAMILIES[variant.subject.family].on("quantized" if kind else "float")
    return base, base.check(variant.check)


def strategy(name: str, dtype_name: str, kind: str | None):
    """The cases the variant's check draws in its test module (`conformance.families`)."""
    from catalogue import WRONG_VARIANTS
    from conformance.families import FAMILIES
    from foundation.dtypes import BY_NAME

    base, info = _check_of(name, kind)
    cases = base.cases(BY_NAME[dtype_name], kind) if kind else base.cases(BY_NAME[dtype_name])
    subject = WRONG_VARIANTS[name].subject
    cases = FAMILIES[subject.family].cases_for(subject, cases)
    for keep in info.keep:
        cases = cases.filter(keep)
    return cases


def measurable(name: str) -> bool:
    from catalogue import WRONG_VARIANTS

    return WRONG_VARIANTS[name].check != "error_parity"  # its cases are calls with bad ids, not drawn weights


def ci_examples(name: str, kind: str | None) -> int:
    """How many cases the ``ci`` profile gives the variant's check in its test module, per dtype (and mode)."""
    from foundation import profiles

    return profiles.examples("ci", _check_of(name, kind)[1].examples)


def configurations(name: str) -> list[tuple[str, str | None]]:
    """(dtype, quantization kind or None) in which the variant must be caught."""
    from catalogue import WRONG_VARIANTS
    from foundation.quantization import KINDS

    variant = WRONG_VARIANTS[name]
    kinds = (variant.quantizations or KINDS) if variant.on_quantized_base else (None,)
    return [(dtype, kind) for dtype in variant.visible_in for kind in kinds]


@dataclass(frozen=True)
class Task:
    variant: str
    dtype: str
    kind: str | None
    examples: int
    seed: int


def run_seed(task: Task) -> dict:
    """Whether one seed catches the variant, and after how many cases (and one replay)."""
    from hypothesis.errors import FlakyFailure

    from catalogue import WRONG_VARIANTS
    from conformance import divergences
    from conformance.families import find_check
    from studies import false_alarms

    from foundation import systematic

    variant = WRONG_VARIANTS[task.variant]
    check = find_check(variant.subject.family, variant.check).run
    base = "quantized" if task.kind else "float"
    known = false_alarms.known_divergences()
    tried: list[dict] = []
    caught_after: list[int] = []
    components: list[tuple[dict, list[dict]]] = []

    def visit(case) -> None:
        tried.append(case.describe())
        measurement = check(variant.subject, case)
        # a failure the suite explains (MLX's CPU refusing a half-precision mixture of experts, say) is no catch
        check_id = false_alarms.check_id(variant.subject.family, base, variant.check, variant.subject.name, tried[-1])
        if not measurement.passed and not divergences.judge(measurement, divergences.covering(known, check_id)).passed:
            caught_after.append(len(tried))
            raise _Caught
        if measurement.passed:
            components.append((tried[-1], [c.to_json() for c in measurement.components]))

    try:
        sampling.draw_chunk(strategy(task.variant, task.dtype, task.kind), task.seed, 0, task.examples, visit)
    except (_Caught, FlakyFailure):
        # Hypothesis replays the failing case; a variant with random behaviour (dropout in eval mode)
        # may pass then, and Hypothesis calls the failure flaky. The first failure is the catch.
        if not caught_after:
            raise
    if caught_after:
        return {"caught": True, "by": "a case", "cases": caught_after[0]}
    # No case failed its bound: the run's pooled errors (`foundation.systematic`) may still be beyond rounding.
    if any(not pooled.passed for pooled in systematic.pool_cases(components)):
        return {"caught": True, "by": "the check run", "cases": len(tried)}
    return {"caught": False, "cases": len(tried), "last_case": tried[-1] if tried else None}


def main(argv: list[str] | None = None) -> int:
    from catalogue import WRONG_VARIANTS

    parser = argparse.ArgumentParser(prog="python -m studies.catch_rates", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=100, help="seeds per variant, dtype and mode (default: %(default)s)"
    )
    parser.add_argument(
        "--examples", type=int, help="cases a seed draws at most (default: as many as the ci profile gives the check)"
    )
    parser.add_argument(
        "--variant", action="append", default=[], choices=sorted(WRONG_VARIANTS), help="(repeatable; default: all)"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS / "catch_rates.json", help="(default: %(default)s)")
    threads.add_option(parser)
    args = parser.parse_args(argv)
    threads.apply_option(parser, args)
    sampling.writable(parser, args.out)
    names = args.variant or sorted(WRONG_VARIANTS)
    start = time.perf_counter()
    rows, tasks, examples = [], [], {}
    for name in names:
        if not measurable(name):
            rows.append(
                {
                    "variant": name,
                    "check": WRONG_VARIANTS[name].check,
                    "measured": False,
                    "why": "its check (error_parity) runs fixed cases, not drawn ones: no seed changes what it sees, "
                    "and tests/test_wrong_variants.py requires it to be caught",
                }
            )
            continue
        for dtype, kind in configurations(name):
            examples[name, dtype, kind] = args.examples or ci_examples(name, kind)
            tasks += [Task(name, dtype, kind, examples[name, dtype, kind], seed) for seed in range(args.seeds)]
    outcomes: dict[tuple, list[dict]] = {}
    for index, (task, outcome) in enumerate(zip(tasks, sampling.spread(run_seed, tasks, args.workers)), 1):
        outcomes.setdefault((task.variant, task.dtype, task.kind), []).append(outcome)
        print(f"\r{index}/{len(tasks)} seeds, {time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for (name, dtype, kind), seeds in outcomes.items():
        caught = [s for s in seeds if s["caught"]]
        rows.append(
            {
                "variant": name,
                "check": WRONG_VARIANTS[name].check,
                "dtype": dtype,
                "quantization": kind,
                "measured": True,
                "examples": examples[name, dtype, kind],
                "seeds": len(seeds),
                "caught": len(caught),
                "rate": len(caught) / len(seeds),
                "by_the_check_run": sum(s["by"] == "the check run" for s in caught),
                "most_cases_to_catch": max((s["cases"] for s in caught), default=None),
                "missed": [s["last_case"] for s in seeds if not s["caught"]][:3],
            }
        )
    command = (
        f"python -m studies.catch_rates --seeds {args.seeds}"
        + (f" --examples {args.examples}" if args.examples else "")
        + "".join(f" --variant {name}" for name in args.variant)
    )
    document = {
        "study": "catch_rates",
        "measured": date.today().isoformat(),
        "environment": sampling.environment(),
        "command": command,
        "seconds": round(time.perf_counter() - start, 1),
        "required_rate": REQUIRED,
        "rows": rows,
    }
    args.out.write_text(json.dumps(document, indent=1) + "\n")
    measured = [row for row in rows if row["measured"]]
    below = [row for row in measured if row["rate"] < REQUIRED]
    print(
        f"{len({r['variant'] for r in measured})} variants measured in {len(measured)} dtype/mode configurations; "
        f"lowest rate {min((r['rate'] for r in measured), default=float('nan')):.2%}; wrote {args.out}"
    )
    for row in below:
        print(
            f"  below {REQUIRED:.0%}: {row['variant']} {row['check']} {row['dtype']} {row['quantization'] or ''}: "
            f"{row['caught']}/{row['seeds']}"
        )
    return 1 if below else 0


if __name__ == "__main__":
    sys.exit(main())
