"""False alarms: run correct implementations over many cases and record every check's largest margin.

``python -m studies.false_alarms --family linear --dtype float32 --cases 100000 [--kind drawn|extreme]
[--base float|conv1d|quantized] [--adapter-dtype float32] [--subject NAME] [--check NAME ...] [--seed S] [--workers N]
[--out FILE]``

Every case goes through every check its family has on that base in that dtype (`conformance.families`),
on the subject and on the reference (peft), both judged against the oracle; the slowest checks
(`EVERY`) on every n-th case only, unless the study names its checks (``--check``), which then run on
every case. A margin above 1 is a false alarm: it is listed with the command that replays it. The default
subject is the family's correct layer of ``catalogue/layers.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from conformance import threads
from foundation.schema import replay_command
from studies import sampling

OUTCOMES = ("raises", "absent", "present")
"""Failures that say what a side did rather than how far its values are: an entry of these leaves the margins of
the cases it does not reach to report (a fused mixture transformers cannot load leaves a dense model's fuse judged)."""

EVERY = {"dropout_scaling": 10, "steps_sgd": 10, "steps_adamw": 10}
"""Checks that run on every n-th case only: each costs as much as the rest of the family's together."""
STATISTICAL = {"dropout_scaling"}
"""Checks whose margin is a statistic's (a correct layer exceeds 1 with probability 1e-9), not rounding's."""
RESULTS = Path(__file__).with_name("results")


def check_id(family: str, base: str, check: str, subject: str, case: dict) -> str:
    """The suite's id of the test that runs `check` on this case, as ``known_divergences.txt`` names it."""
    from conformance.families import FAMILIES
    from foundation.quantization import Quantization

    kind = Quantization(**case["quantization"]).kind if base == "quantized" else None
    return FAMILIES[family].on(base).check_id(check, subject, case["dtype"], kind)


def known_divergences() -> list:
    """The suite's known divergences that hold on this MLX device."""
    from conformance import divergences

    return divergences.load(divergences.DEFAULT_PATH, sampling.mlx_device())


def run_chunk(task: sampling.Study, chunk: int) -> dict:
    """One chunk of cases through every check: counts, the largest margin per check and side, and false alarms.

    Where the suite lists one side's check as a known divergence (the subject's on a quantized base, MLX's own
    quantized product on the CPU; the reference's where peft itself loses precision), that side's failures
    explained by it are counted as that, not as false alarms, and are no margin of the verdict's to report; where
    the entry is about values (not one of `OUTCOMES`), neither are that side's other margins there.
    """
    from conformance import check_run, divergences
    from conformance.families import FAMILIES
    from foundation import profiles
    from subjects.known import resolve
    from studies.check_runs import CheckRuns

    subject = resolve(task.subject)
    known = known_divergences()
    checks = {
        name: info
        for name, info in FAMILIES[task.family].checks_on(task.base).items()
        if info.runs_in(task.dtype)
        and info.not_provided_reason(subject) is None  # as the suite skips it
        and (not task.checks or name in task.checks)
    }
    every = {} if task.checks else EVERY
    found: dict = {"checks": {}, "false_alarms": [], "known_divergences": [], "quantizations": {}}
    runs = {name: CheckRuns(profiles.examples("ci", info.examples)) for name, info in checks.items()}

    def visit(case, index: int) -> None:
        description = case.describe()
        if getattr(case, "quantization", None) is not None:  # a case on a float base has none
            found["quantizations"][case.quantization.kind] = found["quantizations"].get(case.quantization.kind, 0) + 1
        for name, info in checks.items():
            if index % every.get(name, 1):
                continue
            tally = found["checks"].setdefault(name, {"runs": 0, "not_judgeable": 0, "largest": {}})
            if not info.applies(case):  # as the check's test module leaves the case out
                tally["not_judgeable"] += 1
                continue
            measurement = info.run(subject, case)
            tally["runs"] += 1
            replay = replay_command(task.subject, name, description)
            entries = divergences.covering(known, check_id(task.family, task.base, name, task.subject, description))
            diverging = {entry.explanation.side for entry in entries if entry.explanation.failure not in OUTCOMES}
            for comparison in measurement.comparisons:
                if comparison.side in diverging or any(
                    e.explanation.explains(comparison, measurement.hints) for e in entries
                ):
                    continue
                best = tally["largest"].get(comparison.side)
                if best is None or comparison.margin > best["margin"]:
                    tally["largest"][comparison.side] = {
                        "margin": comparison.margin,
                        "quantity": comparison.quantity,
                        "replay": replay,
                    }
            if measurement.passed:
                by_design = {c.quantity for c in measurement.components if check_run.by_design(c.quantity, entries)}
                runs[name].add(description, measurement.components, by_design, entries)
                continue
            finding = {"check": name, "what": measurement.worst.describe(), "replay": replay}
            judgement = divergences.judge(measurement, entries)
            if judgement.passed:
                reasons = dict.fromkeys(entry.reason for _, entry in judgement.explained)
                found["known_divergences"].append({**finding, "reason": "; ".join(reasons)})
            else:
                found["false_alarms"].append(finding)

    found["keys"] = task.each_distinct(chunk, visit)
    found["check_runs"] = {name: found_runs.finished() for name, found_runs in runs.items()}
    return found


def merge(results: list[dict]) -> dict:
    """The chunks' findings as one: counts add up, the largest margins are the largest of all."""
    checks: dict = {}
    for result in results:
        for name, tally in result["checks"].items():
            total = checks.setdefault(name, {"runs": 0, "not_judgeable": 0, "largest": {}})
            total["runs"] += tally["runs"]
            total["not_judgeable"] += tally.get("not_judgeable", 0)
            for side, largest in tally["largest"].items():
                if side not in total["largest"] or largest["margin"] > total["largest"][side]["margin"]:
                    total["largest"][side] = largest
    from studies import check_runs

    names = sorted({name for result in results for name in result.get("check_runs", {})})
    runs = {
        name: check_runs.merge([r["check_runs"][name] for r in results if name in r["check_runs"]]) for name in names
    }
    return {
        "cases": sampling.distinct(results),
        "checks": checks,
        "check_runs": {name: merged for name, merged in runs.items() if merged["terms"]},
        "false_alarms": [alarm for result in results for alarm in result["false_alarms"]],
        "known_divergences": [found for result in results for found in result["known_divergences"]],
        "quantizations": {
            kind: sum(result["quantizations"].get(kind, 0) for result in results)
            for kind in sorted({kind for result in results for kind in result["quantizations"]})
        },
    }


def largest_margin(merged: dict, statistical: bool = False) -> float:
    return max(
        (
            side["margin"]
            for name, tally in merged["checks"].items()
            if (name in STATISTICAL) == statistical
            for side in tally["largest"].values()
        ),
        default=0.0,
    )


def default_subject(family: str) -> str:
    """The family's correct layer of the catalogue; for a whole model, the installed package's entry points."""
    from catalogue import CORRECT
    from subjects.known import CATALOGUE

    return next(subject.name for subject in (*CORRECT, *CATALOGUE) if subject.family == family)


def main(argv: list[str] | None = None) -> int:
    from conformance.families import FAMILIES
    from foundation.dtypes import BY_NAME

    parser = argparse.ArgumentParser(prog="python -m studies.false_alarms", description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--dtype", required=True, choices=list(BY_NAME))
    parser.add_argument(
        "--subject", help="a subject of the family (default: its correct layer in catalogue/; a model: mlx-lm's)"
    )
    sampling.add_case_options(parser, default_cases=1000)
    parser.add_argument(
        "--check",
        action="append",
        metavar="NAME",
        help="only this check of the family, on every case (may be given more than once; default: every check, the "
        f"slowest ({', '.join(EVERY)}) on every {max(EVERY.values())}th case)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="the JSON to write (default: studies/results/false_alarms/[<subject>-]<family>[-<base>]-<dtype>-<kind>"
        "[-seed<S>].json, the subject named when it is not the default)",
    )
    args = parser.parse_args(argv)
    threads.apply_option(parser, args)
    sampling.check_usage(parser, args.family, args.kind, args.base, args.dtype, args.adapter_dtype)
    subject = args.subject or default_subject(args.family)
    unknown = sorted(set(args.check or ()) - set(FAMILIES[args.family].checks_on(args.base)))
    if unknown:
        parser.error(
            f"{args.family} has no check {', '.join(unknown)} on a {args.base} base "
            f"(its checks: {', '.join(FAMILIES[args.family].checks_on(args.base))})"
        )
    named = None if subject == default_subject(args.family) else subject
    name = sampling.result_name(args.family, args.base, args.dtype, args.kind, args.adapter_dtype, args.seed, named)
    out = args.out or RESULTS / "false_alarms" / name
    sampling.writable(parser, out)

    start = time.perf_counter()
    study = sampling.study_of(args, run_chunk, subject)
    results = sampling.run(
        study,
        args.cases,
        args.workers,
        lambda results: f", {sum(len(r['false_alarms']) for r in results)} false alarms",
    )
    merged = merge(results)
    command = " ".join(
        [
            "python -m studies.false_alarms",
            f"--family {args.family}",
            f"--dtype {args.dtype}",
            f"--cases {args.cases}",
            f"--kind {args.kind}",
            *sampling.base_option(args.base, args.adapter_dtype),
            f"--subject {subject}",
            *(f"--check {name}" for name in args.check or ()),
            f"--seed {args.seed}",
        ]
    )
    document = {
        **sampling.study_document("false_alarms", subject, args, time.perf_counter() - start, command),
        "largest_margin": largest_margin(merged),
        "largest_statistical_margin": largest_margin(merged, statistical=True),
        **merged,
    }
    out.write_text(json.dumps(document, indent=1) + "\n")
    known = f", {len(merged['known_divergences'])} known divergences" if merged["known_divergences"] else ""
    print(
        f"{subject} {args.family} on a {args.base} base, {args.dtype} {args.kind}: {merged['cases']} distinct cases, "
        f"{len(merged['false_alarms'])} false alarms{known}, largest margin {document['largest_margin']:.3f}; "
        f"wrote {out}"
    )
    for alarm in merged["false_alarms"][:5]:
        print(f"  {alarm['check']}: {alarm['what']}\n  replay: {alarm['replay']}")
    run_alarms = print_check_runs(merged["check_runs"], subject)
    return 1 if merged["false_alarms"] or run_alarms else 0


def print_check_runs(runs: dict, subject: str) -> int:
    """One line per check on its runs' verdict (`studies.check_runs`), and, where runs were false alarms, the
    replay of the case that lies farthest beyond its own scale; the number of runs beyond the threshold."""
    alarms = 0
    for name, merged in runs.items():
        terms = merged["terms"]
        counted = sum(t["false_alarms"] for t in terms.values())
        largest = max(
            (t["largest_statistic"] for t in terms.values() if t["largest_statistic"] is not None), default=0.0
        )
        alarms += counted
        runs_of = max((t["runs"] for t in terms.values()), default=0)
        known = sum(t.get("known_divergences", 0) for t in terms.values())
        unexplained = max((t["largest_unexplained_statistic"] or 0.0 for t in terms.values()), default=0.0)
        print(
            f"  check runs of {name} ({merged['size']} cases each, {runs_of} runs): {counted} false alarms"
            f"{f', {known} known divergences' if known else ''}, largest statistic {largest:.3g} of "
            f"{merged['threshold']:.3g}{f' ({unexplained:.3g} of the runs none explains)' if known else ''}"
        )
        for key, term in terms.items():
            if term["false_alarms"] and term.get("worst_case"):
                worst = term["worst_case"]
                print(
                    f"    {key}: its farthest case, {worst['statistic']:.3g} scales: "
                    f"{replay_command(subject, name, worst['case'])}"
                )
    return alarms


if __name__ == "__main__":
    sys.exit(main())
