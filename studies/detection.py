"""Detection thresholds: the smallest relative error in a forward output that the verdict catches.

``python -m studies.detection --family linear --dtype float32 [--cases N] [--kind drawn|extreme]
[--base float|conv1d|quantized] [--seed S] [--workers N] [--out FILE]``

For each case the correct layer's output y' (which passes) is perturbed three ways, each by a
relative amount e, and judged against the oracle's y with the suite's own allowed error:

- ``lora``: the LoRA term ``y - y(B = 0)`` scaled by 1 + e (a wrong scale, a dropped rank...);
- ``base``: the base term ``y(B = 0) - b`` scaled by 1 + e;
- ``element``: the output's largest element alone scaled by 1 + e.

The verdict's margin is convex in e, so for each case the smallest |e| caught in both directions
is computed exactly (no search). No verdict can see a term that is smaller than the output's own
rounding, so each case also gets the term's `share` of the output (its largest element over the
output's largest) and an ideal threshold: the e at which the term moves some element by one rounding
of the dtype (``u |y|``), what a verdict allowing only a correctly rounded output would catch.
A case whose unperturbed output already fails has no threshold and is left out: as a known
divergence where the suite lists the forward check as one (on a quantized base, MLX's CPU quantized
product), else as failing (a false alarm: the study exits 1).

Published per dtype and family: the threshold, the 99th percentile of e over the cases whose term is
at least a tenth of the output (an error of that relative size is caught in 99% of them), and the
looseness, the verdict's e over the ideal e (the median and 99th percentile over all cases): how
much of the detection the error model gives away to its rigour.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from conformance import threads
from studies import false_alarms, sampling

PERTURBATIONS = ("lora", "base", "element")
QUANTILES = (0.5, 0.9, 0.99)
VISIBLE_SHARE = 0.1
"""The threshold is taken over the cases whose perturbed term is at least this share of the output."""
RESULTS = Path(__file__).with_name("results")


def smallest_caught(error: np.ndarray, allowed: np.ndarray, term: np.ndarray) -> float:
    """The smallest e >= 0 such that ``error + s e term`` leaves ``[-allowed, allowed]`` somewhere, for
    both signs s: beyond it the verdict fails in both directions. Infinite where `term` is zero."""
    error, allowed, term = (np.ravel(a) for a in (error, allowed, term))
    moving = term != 0
    if not moving.any():
        return float("inf")
    e, a, t = error[moving], allowed[moving], term[moving]
    up = np.min((a - np.sign(t) * e) / np.abs(t))  # error + e t reaches +-allowed
    down = np.min((a + np.sign(t) * e) / np.abs(t))  # error - e t does
    return float(max(up, down, 0.0))


def _without_adapter(case):
    """The case with B = 0 and no bias: what is left is the base term."""
    from foundation.switch_cases import SwitchCase

    def linear(case):
        return replace(case, lora_B=np.zeros_like(case.lora_B), has_bias=False, bias=None)

    if isinstance(case, SwitchCase):
        return replace(case, experts=tuple(linear(expert) for expert in case.experts))
    if hasattr(case, "lookup"):
        return replace(case, lookup=linear(case.lookup))
    return linear(case)


def forward(family: str, subject, case) -> tuple[np.ndarray, object, object]:
    """The subject's output, the oracle's (a `Tracked`) and the oracle's for the case without adapter and bias."""
    import mlx.core as mx

    from conformance.families import FAMILIES
    from reference import oracle
    from subjects import bridge

    layout = FAMILIES[family].layout
    if layout == "switch":
        output, expect = bridge.switch_call(subject.build(case), case), oracle.switch_forward
    elif layout == "embedding":
        output, expect = subject.build(case)(mx.array(case.ids)), oracle.embedding_forward
    else:
        output, expect = subject.build(case)(bridge.mlx_array(case.x, case.dtype)), oracle.linear_forward
    mx.eval(output)
    return bridge.to_numpy(output), expect(case), expect(_without_adapter(case))


def failure_kind(known: list, task: sampling.Study, description: dict) -> str:
    """Where the correct layer's own output fails: ``known_divergences`` where the suite lists its forward check
    as one (MLX's CPU quantized product: see ``false_alarms.run_chunk``), else ``failing``, a false alarm."""
    from conformance import divergences

    check = false_alarms.check_id(task.family, task.base, "forward", task.subject, description)
    return "known_divergences" if divergences.covering(known, check) else "failing"


def run_chunk(task: sampling.Study, chunk: int) -> dict:
    from foundation.verdict import allowed_error, scaling_roundings
    from subjects.known import resolve

    subject = resolve(task.subject)
    known = false_alarms.known_divergences()
    found: dict = {**{name: [] for name in PERTURBATIONS}, "failing": [], "known_divergences": []}

    def visit(case, index: int) -> None:
        observed, expected, base = forward(task.family, subject, case)
        allowed = allowed_error(expected)
        error = observed - expected.value
        if np.any(np.abs(error) > allowed):  # no threshold to speak of
            description = case.describe()
            found[failure_kind(known, task, description)].append(description)
            return
        largest = np.zeros_like(expected.value)
        if largest.size:
            at = np.unravel_index(np.argmax(np.abs(expected.value)), largest.shape)
            largest[at] = expected.value[at]
        terms = {
            "lora": expected.value - base.value - _bias_of(case, expected.value),
            "base": base.value,
            "element": largest,
        }
        ideal = case.dtype.unit_roundoff * np.abs(expected.value) + case.dtype.underflow
        roundings = scaling_roundings(_parameters(case).scale, case.dtype)
        scale = float(np.max(np.abs(expected.value), initial=0.0))
        for name, term in terms.items():
            share = float(np.max(np.abs(term), initial=0.0)) / scale if scale else 0.0
            caught, ideal_caught = smallest_caught(error, allowed, term), smallest_caught(0 * error, ideal, term)
            found[name].append((caught, ideal_caught, share, roundings))

    found["keys"] = task.each_distinct(chunk, visit)
    return found


def _parameters(case):
    """The linear case that holds a case's parameters (an embedding's lookup, a switch layer's first expert)."""
    return getattr(case, "lookup", None) or getattr(case, "first", None) or case


def _bias_of(case, like: np.ndarray) -> np.ndarray:
    """The bias as it appears in the output (zero without one): ``y - y(B = 0, no bias)`` keeps it."""
    from foundation.switch_cases import SwitchCase

    if isinstance(case, SwitchCase):
        if not case.first.has_bias:
            return np.zeros_like(like)
        biases = case.stacked("bias")  # (E, out)
        return biases[case.indices]
    if hasattr(case, "lookup") or not case.has_bias:
        return np.zeros_like(like)
    return np.broadcast_to(case.bias, like.shape)


def quantile(values: np.ndarray, q: float) -> float:
    """A value of the sample (no interpolation, so an infinite one is reported as such)."""
    return float(np.quantile(values, q, method="higher")) if len(values) else float("nan")


def summarize(records: list[tuple[float, float, float, int]]) -> dict:
    """Per-case (e caught, ideal e, share, the scale's roundings) to the published figures (see the module's
    docstring); the looseness also by how many roundings the verdict allows the scale (`scaling_roundings`)."""
    columns = zip(*records) if records else ((),) * 4
    caught, ideal, share, roundings = (np.array(column, dtype=np.float64).reshape(-1) for column in columns)
    visible = caught[share >= VISIBLE_SHARE]
    with np.errstate(divide="ignore", invalid="ignore"):
        looseness = np.where(np.isfinite(ideal) & (ideal > 0), caught / ideal, np.nan)
    finite = np.isfinite(looseness)
    return {
        "cases": len(caught),
        "visible_cases": len(visible),
        "threshold": quantile(visible, 0.99),
        **{f"visible_q{round(q * 100)}": quantile(visible, q) for q in QUANTILES[:-1]},
        "all_cases_q99": quantile(caught, 0.99),
        "never_caught": int(np.sum(~np.isfinite(caught))),
        "looseness_median": quantile(looseness[finite], 0.5),
        "looseness_q99": quantile(looseness[finite], 0.99),
        "looseness_median_by_scale_roundings": {
            str(k): {"cases": int(np.sum(chosen)), "median": quantile(looseness[chosen], 0.5)}
            for k in (0, 1, 2)
            for chosen in [finite & (roundings == k)]
        },
    }


def main(argv: list[str] | None = None) -> int:
    from conformance.families import FAMILIES
    from foundation.dtypes import BY_NAME

    parser = argparse.ArgumentParser(prog="python -m studies.detection", description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--dtype", required=True, choices=list(BY_NAME))
    sampling.add_case_options(parser, default_cases=2000)
    parser.add_argument(
        "--out",
        type=Path,
        help="the JSON to write (default: studies/results/detection/<family>[-<base>]-<dtype>-<kind>[-seed<S>].json)",
    )
    args = parser.parse_args(argv)
    threads.apply_option(parser, args)
    sampling.check_usage(parser, args.family, args.kind, args.base, args.dtype, args.adapter_dtype)
    subject = false_alarms.default_subject(args.family)
    name = sampling.result_name(args.family, args.base, args.dtype, args.kind, args.adapter_dtype, args.seed)
    out = args.out or RESULTS / "detection" / name
    sampling.writable(parser, out)

    start = time.perf_counter()
    study = sampling.study_of(args, run_chunk, subject)
    results = sampling.run(study, args.cases, args.workers, lambda results: "")
    command = " ".join(
        [
            "python -m studies.detection",
            f"--family {args.family}",
            f"--dtype {args.dtype}",
            f"--cases {args.cases}",
            f"--kind {args.kind}",
            *sampling.base_option(args.base, args.adapter_dtype),
            f"--seed {args.seed}",
        ]
    )
    document = {
        **sampling.study_document("detection", subject, args, time.perf_counter() - start, command),
        "cases": sampling.distinct(results),
        "failing": [case for result in results for case in result["failing"]],
        "known_divergences": [case for result in results for case in result["known_divergences"]],
        "perturbations": {name: summarize([r for result in results for r in result[name]]) for name in PERTURBATIONS},
    }
    out.write_text(json.dumps(document, indent=1) + "\n")
    thresholds = ", ".join(f"{name} {document['perturbations'][name]['threshold']:.2g}" for name in PERTURBATIONS)
    loose = ", ".join(f"{name} {document['perturbations'][name]['looseness_median']:.2g}" for name in PERTURBATIONS)
    print(
        f"{args.family} on a {args.base} base, {args.dtype} {args.kind}: {document['cases']} cases; "
        "caught in 99% of those where the term is "
        f"at least {VISIBLE_SHARE:.0%} of the output: {thresholds}; median looseness over one rounding: {loose}; "
        f"{len(document['failing'])} failing, {len(document['known_divergences'])} known divergences left out; "
        f"wrote {out}"
    )
    return 1 if document["failing"] else 0


if __name__ == "__main__":
    sys.exit(main())
