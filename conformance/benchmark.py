"""Benchmark: ``python -m conformance.benchmark [--cases N] [--subject NAME] [--dtype NAME] [--same-cases]``.

By default, runs every check on a fixed, derandomized set of cases per subject and dtype, without
pytest, and prints cases per second and where the time goes: subject, reference (peft), oracle (float64
and the error model) and harness (drawing cases, judging, bookkeeping).

With ``--same-cases``, draws the cases of the forward check once (as the ci profile does) and runs
on them, interleaved in blocks, the suite's forward and merge checks (each recorded and asserted as
a test does) and `bare_loop` (the same work done plainly), and prints the ratio of their speeds: what
the suite's harness costs beyond the work itself. Both first run one block's copies untimed, so that
one-time costs (first calls into torch, peft and MLX) fall on neither side.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import_start = time.perf_counter()

import mlx.core as mx  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from conformance import bare_loop, checks, threads  # noqa: E402
from conformance.asserting import message  # noqa: E402
from conformance.families import FAMILIES  # noqa: E402
from conformance.recording import Recorder  # noqa: E402
from conformance.timing import PhaseTimer  # noqa: E402
from foundation.cases import linear_cases  # noqa: E402
from foundation.dtypes import BY_NAME as DTYPES  # noqa: E402
from subjects.bridge import LoRALinearConvention  # noqa: E402
from subjects.known import BY_NAME, CATALOGUE, Subject, select, versions  # noqa: E402

IMPORT_SECONDS = time.perf_counter() - import_start
PHASES = ("subject", "reference", "oracle", "systematic", "harness")
SAME_CASES_SUBJECT = "mlx_lm.LoRALinear"


def run(subjects: list[Subject], dtypes: list[str], cases_each: int, timer: PhaseTimer) -> int:
    """Check `cases_each` cases per subject and dtype; return how many cases ran."""
    ran = 0
    for subject in subjects:
        for dtype in dtypes:

            @settings(max_examples=cases_each, derandomize=True, database=None, deadline=None)
            @given(case=FAMILIES[subject.family].study_cases(DTYPES[dtype]))
            def check_all(case):
                nonlocal ran
                ran += 1
                for info in FAMILIES[subject.family].checks_on("float").values():
                    if info.runs_in(dtype):
                        info.run(subject, case, timer)

            check_all()
    return ran


def drawn(dtype: str, count: int) -> list:
    """The forward check's first `count` cases, drawn as the ci profile draws them (derandomized)."""
    found: list = []

    @settings(
        max_examples=count,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=linear_cases(DTYPES[dtype]))
    def collect(case):
        found.append(case)

    collect()
    return found


def suite_checks(subject: Subject, case, recorder: Recorder, timer: PhaseTimer) -> bool:
    """The forward and merge checks as their tests run them: measured, recorded, asserted."""
    passed = True
    for check in (checks.forward, checks.merge):
        measurement = check(subject, case, timer)
        recorder.record(measurement, final=True)
        if not measurement.passed:
            message(measurement, recorder.check_id)
            passed = False
    return passed


def same_cases(subject: Subject, dtype: str, count: int, block: int) -> dict:
    """Seconds and phases of the suite's forward and merge checks and of `bare_loop` on the same cases, by block."""
    cases = drawn(dtype, count)
    copies = [dataclasses.replace(case) for case in cases]  # the same values, nothing the suite's checks keep
    recorder = Recorder({"versions": versions(), "device": str(mx.default_device())})
    timers = {"suite": PhaseTimer(), "bare": PhaseTimer()}
    blocks: dict[str, list[float]] = {"suite": [], "bare": []}
    agreed = {"suite": 0, "bare": 0}

    def done_with(kept: list, index: int):  # as a test lets its case go once its checks are done
        case, kept[index] = kept[index], None
        return case

    work = {
        "suite": lambda index: suite_checks(subject, done_with(cases, index), recorder, timers["suite"]),
        "bare": lambda index: bare_loop.run(subject, done_with(copies, index), timers["bare"]),
    }
    for index in range(min(block, len(cases))):  # one-time costs (first calls, lazy imports) go to neither side
        suite_checks(subject, dataclasses.replace(cases[index]), Recorder(recorder.meta), PhaseTimer())
        bare_loop.run(subject, dataclasses.replace(cases[index]), PhaseTimer())
    for number, start in enumerate(range(0, len(cases), block)):
        order = ("suite", "bare") if number % 2 == 0 else ("bare", "suite")  # neither always runs on a warmer machine
        for name in order:
            began = time.perf_counter()
            agreed[name] += sum(work[name](index) for index in range(start, min(start + block, len(cases))))
            blocks[name].append(time.perf_counter() - began)
    return {"cases": len(copies), "blocks": blocks, "timers": timers, "agreed": agreed}


def speed_ratio(blocks: dict[str, list[float]]) -> tuple[float, float]:
    """The suite's speed over the bare loop's: over all blocks, and the median of the blocks' (which a stall of
    the machine in one block does not move)."""
    overall = sum(blocks["bare"]) / sum(blocks["suite"])
    return overall, float(statistics.median(bare / suite for bare, suite in zip(blocks["bare"], blocks["suite"])))


def _phases(timer: PhaseTimer, total: float) -> str:
    phases = dict(timer.seconds)
    phases["harness"] = total - sum(phases.values())
    return ", ".join(f"{phase} {phases.get(phase, 0.0):.2f} s" for phase in PHASES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conformance.benchmark", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, help="cases per subject and dtype (default: 100; with --same-cases 150)")
    parser.add_argument(
        "--subject",
        action="append",
        default=[],
        help="subject or pattern such as mlx_vlm.* "
        f"(repeatable; default: all; with --same-cases one LoRALinear, default {SAME_CASES_SUBJECT})",
    )
    parser.add_argument(
        "--dtype",
        action="append",
        default=[],
        choices=list(DTYPES),
        help="dtype (repeatable; default: all; with --same-cases one, default float32)",
    )
    parser.add_argument(
        "--same-cases", action="store_true", help="the suite's forward and merge checks against a bare loop"
    )
    parser.add_argument(
        "--block", type=int, default=10, help="with --same-cases: cases per interleaved block (default: %(default)s)"
    )
    threads.add_option(parser)
    args = parser.parse_args(argv)
    policy = threads.apply_option(parser, args)
    try:
        subjects = select(args.subject) or ([BY_NAME[SAME_CASES_SUBJECT]] if args.same_cases else list(CATALOGUE))
    except LookupError as error:
        parser.error(str(error))
    mx.set_default_device(mx.gpu if mx.metal.is_available() else mx.cpu)
    setup = f"MLX device {mx.default_device()}; {threads.describe(policy, threads.in_force())}"
    if args.same_cases:
        return _same_cases_main(parser, args, subjects, setup)
    import_start = time.perf_counter()
    for subject in subjects:
        if subject.not_provided_reason():
            print(subject.not_provided_reason(), file=sys.stderr)
    subjects = [subject for subject in subjects if not subject.not_provided_reason()]
    imports = IMPORT_SECONDS + time.perf_counter() - import_start

    timer = PhaseTimer()
    start = time.perf_counter()
    ran = run(subjects, args.dtype or list(DTYPES), args.cases or 100, timer)
    total = time.perf_counter() - start
    print(f"imports: {imports:.1f} s ({setup})")
    print(f"{ran} cases, each through every check of its family, in {total:.1f} s: {ran / total:.0f} cases/s")
    phases = dict(timer.seconds)
    phases["harness"] = total - sum(phases.values())
    for phase in PHASES:
        seconds = phases.get(phase, 0.0)
        print(f"  {phase:<9} {seconds:7.2f} s  {100 * seconds / total:5.1f} %")
    return 0 if ran else 1


def _same_cases_main(
    parser: argparse.ArgumentParser, args: argparse.Namespace, subjects: list[Subject], setup: str
) -> int:
    if len(subjects) != 1 or len(args.dtype) > 1:
        parser.error("--same-cases takes one --subject and one --dtype")
    subject, dtype = subjects[0], (args.dtype or ["float32"])[0]
    if not isinstance(subject.convention, LoRALinearConvention) or subject.family != "linear":
        parser.error(f"--same-cases: the bare loop builds a LoRALinear with from_base and fuse(); {subject} is not one")
    if subject.not_provided_reason():
        parser.error(f"--same-cases: {subject.not_provided_reason()}")
    if args.block < 1:
        parser.error(f"--block {args.block}: at least 1")
    found = same_cases(subject, dtype, args.cases or 150, args.block)
    print(f"{setup}")
    print(f"{found['cases']} {dtype} cases of {subject}, forward and merge, in blocks of {args.block}, interleaved:")
    for name, label in (("suite", "the suite's checks"), ("bare", "the bare loop     ")):
        total = sum(found["blocks"][name])
        print(
            f"  {label} {total:6.2f} s ({_phases(found['timers'][name], total)}); "
            f"{found['agreed'][name]} of {found['cases']} cases within the allowed error"
        )
    overall, median = speed_ratio(found["blocks"])
    print(
        f"ratio: the suite runs at {overall:.2f}x the bare loop's speed (median of the blocks {median:.2f}x; "
        f"its cost is {1 / overall:.2f}x the bare work)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
