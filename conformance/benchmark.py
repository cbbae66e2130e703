"""Benchmark: ``python -m conformance.benchmark [--cases N] [--subject NAME] [--dtype NAME]``.

Runs every check on a fixed, derandomized set of cases per subject and dtype, without pytest, and
prints cases per second and where the time goes: subject, reference (peft), oracle (float64 and the
error model) and harness (drawing cases, judging, bookkeeping).
"""

from __future__ import annotations

import argparse
import sys
import time

import_start = time.perf_counter()

import mlx.core as mx  # noqa: E402
from hypothesis import given, settings  # noqa: E402

from conformance import registry  # noqa: E402
from conformance.cases import cases_for  # noqa: E402
from conformance.dtypes import BY_NAME as DTYPES  # noqa: E402
from conformance.subjects import CATALOGUE, Subject, select  # noqa: E402
from conformance.timing import PhaseTimer  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - import_start


def run(subjects: list[Subject], dtypes: list[str], cases_each: int, timer: PhaseTimer) -> int:
    """Check `cases_each` cases per subject and dtype; return how many cases ran."""
    ran = 0
    for subject in subjects:
        for dtype in dtypes:

            @settings(max_examples=cases_each, derandomize=True, database=None, deadline=None)
            @given(case=cases_for(subject.family, DTYPES[dtype]))
            def check_all(case):
                nonlocal ran
                ran += 1
                for name, check in registry.FAMILY_CHECKS[subject.family].items():
                    if registry.runs_in(name, dtype):
                        check(subject, case, timer)

            check_all()
    return ran


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100, help="cases per subject and dtype (default: %(default)s)")
    parser.add_argument("--subject", action="append", default=[], help="subject or pattern such as mlx_vlm.* (repeatable; default: all)")
    parser.add_argument("--dtype", action="append", default=[], choices=list(DTYPES), help="dtype (repeatable; default: all)")
    args = parser.parse_args(argv)
    try:
        subjects = select(args.subject) or list(CATALOGUE)
    except LookupError as error:
        parser.error(str(error))
    mx.set_default_device(mx.gpu if mx.metal.is_available() else mx.cpu)
    import_start = time.perf_counter()
    for subject in subjects:
        if subject.not_provided_reason():
            print(subject.not_provided_reason(), file=sys.stderr)
    subjects = [subject for subject in subjects if not subject.not_provided_reason()]
    imports = IMPORT_SECONDS + time.perf_counter() - import_start

    timer = PhaseTimer()
    start = time.perf_counter()
    ran = run(subjects, args.dtype or list(DTYPES), args.cases, timer)
    total = time.perf_counter() - start
    phases = dict(timer.seconds)
    phases["harness"] = total - sum(phases.values())
    print(f"imports: {imports:.1f} s (MLX device {mx.default_device()})")
    print(f"{ran} cases, each through every check of its family, in {total:.1f} s: {ran / total:.0f} cases/s")
    for phase in ("subject", "reference", "oracle", "harness"):
        seconds = phases.get(phase, 0.0)
        print(f"  {phase:<9} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    return 0 if ran else 1


if __name__ == "__main__":
    sys.exit(main())
