"""Detection by the whole-model verdict: the smallest error of the adapters' contribution that it catches.

``python -m studies.model_detection --dtype bfloat16 [--cases N] [--seed S] [--workers N] [--out FILE]``

For each drawn model case (`foundation.model_cases`), mlx-lm's adapted model's logits y' are judged as the ``logits``
check judges them (`foundation.model_verdict`), then perturbed as a wrong scale would: the adapters' contribution to
the logits, c = y - y(no adapters) in float64, scaled by 1 + e, y' + e c. The RMS error of that is convex in e, so
the smallest |e| caught in both directions is solved exactly (a quadratic). Published per dtype: its quantiles over
the cases, the share of cases that catch e = 1% and 10%, and the e a ci run (the ``logits`` check's cases) catches in
99 runs of 100: where a fraction F(e) of cases catch e, a run of n cases misses it with probability (1 - F(e))^n.
A case whose unperturbed logits already fail is counted and left out (the study exits 1: a false alarm).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from conformance import threads
from studies import sampling

QUANTILES = (0.5, 0.9, 0.99)
CATCH_SIZES = (0.01, 0.1)
RESULTS = Path(__file__).with_name("results")


def smallest_caught(error: np.ndarray, contribution: np.ndarray, allowed: float) -> float:
    """The smallest e >= 0 at which ``rms(error + s e contribution) > allowed`` for both signs s."""
    n = error.size
    cc, dc, dd = float(np.sum(contribution**2)), float(np.sum(error * contribution)), float(np.sum(error**2))
    slack = allowed**2 * n - dd
    if slack < 0:
        return 0.0
    if cc == 0:
        return math.inf
    root = math.sqrt(dc**2 + cc * slack)
    return max((-dc + root) / cc, (dc + root) / cc)


def measure(study: sampling.Study, chunk: int) -> dict:
    """One chunk: per case, the smallest relative error of the adapters' contribution the verdict catches."""
    from conformance import model_checks
    from foundation.dtypes import BY_NAME
    from foundation.model_verdict import allowed_error, rms
    from reference import models as reference
    from subjects import models as subject_side

    dtype = BY_NAME[study.dtype]
    entry_points = subject_side.MlxLmEntryPoints()
    found: dict = {"smallest": [], "failing": []}

    def visit(case, index: int) -> None:
        oracle = reference.oracle_logits(case)
        contribution = oracle - reference.base_logits(case)
        references = model_checks.yardsticks(case, model_checks.reference_orders(case))
        observed = subject_side.logits(entry_points.adapted(case), case)
        allowed = allowed_error(references, oracle, dtype, reference.oracle_largest(case))[0]
        if rms(observed - oracle) > allowed:
            found["failing"].append(case.describe())
            return
        found["smallest"].append(smallest_caught(observed - oracle, contribution, allowed))

    found["keys"] = study.each_distinct(chunk, visit)
    return found


def summary(smallest: list[float], run_cases: int) -> dict:
    values = np.sort(np.array(smallest))
    caught = {f"{size:g}": float(np.mean(values <= size)) for size in CATCH_SIZES}
    # A run of `run_cases` catches e in 99% of runs where a share F(e) >= 1 - 0.01^(1/n) of cases catch it.
    needed = 1 - 0.01 ** (1 / run_cases)
    at = min(len(values) - 1, max(0, math.ceil(needed * len(values)) - 1))
    return {
        "cases": len(values),
        # A case whose adapters do not reach the logits (a k_proj over one token) catches no error: inf, not NaN.
        "quantiles": {f"{q:g}": float(np.quantile(values, q, method="inverted_cdf")) for q in QUANTILES},
        "unreached": int(np.count_nonzero(np.isinf(values))),
        "caught": caught,
        "run_cases": run_cases,
        "ci_run_99": float(values[at]),
    }


def main(argv: list[str] | None = None) -> int:
    from foundation import profiles
    from foundation.dtypes import BY_NAME

    parser = argparse.ArgumentParser(prog="python -m studies.model_detection", description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", required=True, choices=list(BY_NAME))
    parser.add_argument("--cases", type=int, default=500, help="distinct cases (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the study's seed (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="processes (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="default: studies/results/models/detection-<dtype>.json")
    threads.add_option(parser)
    args = parser.parse_args(argv)
    threads.apply_option(parser, args)
    out = sampling.writable(parser, args.out or RESULTS / "models" / f"detection-{args.dtype}.json")
    args.family, args.kind, args.base, args.adapter_dtype = "model", "drawn", "float", None
    start = time.perf_counter()
    study = sampling.study_of(args, measure, "mlx_lm.load_adapters")
    results = sampling.run(study, args.cases, args.workers, lambda r: f", {sum(len(x['failing']) for x in r)} failing")
    from conformance.families import MODEL

    run_cases = profiles.examples("ci", MODEL.on("float").check("logits").examples)
    failing = [case for result in results for case in result["failing"]]
    command = f"python -m studies.model_detection --dtype {args.dtype} --cases {args.cases} --seed {args.seed}"
    document = {
        **sampling.study_document(
            "model_detection", "mlx_lm.load_adapters", args, time.perf_counter() - start, command
        ),
        "summary": summary([e for result in results for e in result["smallest"]], run_cases),
        "failing": failing,
    }
    out.write_text(json.dumps(document, indent=1) + "\n")
    found = document["summary"]
    print(
        f"mlx_lm.load_adapters model logits, {args.dtype}: {found['cases']} cases, {len(failing)} failing; smallest "
        f"scale error of the adapters' contribution caught: median {found['quantiles']['0.5']:.3g}, 99% of cases "
        f"{found['quantiles']['0.99']:.3g}; 1% caught in {found['caught']['0.01']:.0%} of cases, 10% in "
        f"{found['caught']['0.1']:.0%}; 99% of ci runs ({run_cases} cases) catch {found['ci_run_99']:.3g}; wrote {out}"
    )
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
