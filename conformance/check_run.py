"""The verdict of a whole check run: after every case of a check has passed its bound, its errors pooled along each
term of the formula (`foundation.systematic`) must stay within what rounding explains.

The plugin calls `judge` when a check's test has drawn all its cases; a pooled failure fails that test, unless a
known divergence (``| QUANTITY: systematic ~ REGEX``) explains it, as it would a failing comparison."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from conformance.divergences import KnownDivergence, judge as judge_comparisons
from foundation import systematic
from foundation.schema import Row
from foundation.verdict import Comparison, Measurement


@dataclass
class CheckRun:
    """A check run's pooled components and which of its failures known divergences explain."""

    pooled: list[systematic.Pooled] = field(default_factory=list)
    unexplained: list[Comparison] = field(default_factory=list)
    explained: list[tuple[Comparison, KnownDivergence]] = field(default_factory=list)
    by_design: dict[str, KnownDivergence] = field(default_factory=dict)
    """Quantities not judged, by the entry that says their values differ from the formula in every case."""

    @property
    def passed(self) -> bool:
        return not self.unexplained

    def records(self) -> list[dict]:
        """Each pooled component with its verdict: what the results file keeps of the check run."""
        explained = {comparison.problem: entry for comparison, entry in self.explained}
        written = []
        for pooled in self.pooled:
            entry = self.by_design.get(pooled.quantity) or explained.get(pooled.describe())
            verdict = "pass" if pooled.passed else "fail"
            if pooled.quantity in self.by_design:
                verdict = "not judged"
            elif entry is not None:
                verdict = "known divergence"
            line = None if entry is None else entry.line
            written.append({**pooled.to_json(), "verdict": verdict, "entry": line, "description": pooled.describe()})
        return written


def by_design(quantity: str, entries: list[KnownDivergence]) -> KnownDivergence | None:
    """An entry saying `quantity`'s values are beyond the bound in every case (not only @sometimes): the layer
    computes another formula, whose difference its passing cases carry too, below their bound."""
    return next(
        (
            e
            for e in entries
            if e.explanation.failure == "beyond" and not e.sometimes and e.explanation.covers(quantity)
        ),
        None,
    )


def failing(pooled: systematic.Pooled) -> Comparison:
    """A pooled component beyond rounding, as the failing comparison a known divergence can explain."""
    margin = pooled.statistic / systematic.THRESHOLD
    return Comparison(pooled.quantity, "subject", margin=margin, problem=pooled.describe(), kind="systematic")


def judge(rows: list[Row], entries: list[KnownDivergence]) -> CheckRun:
    """Pool a check run's rows and judge each pooled component, with the known divergences covering the check."""
    run = CheckRun(systematic.pool_rows(rows))
    for pooled in run.pooled:
        entry = by_design(pooled.quantity, entries)
        if entry is not None:
            run.by_design[pooled.quantity] = entry
    failures = [failing(p) for p in run.pooled if not p.passed and p.quantity not in run.by_design]
    if failures:
        subject, check = rows[0].subject, rows[0].check
        judgement = judge_comparisons(Measurement(subject, check, {}, failures), entries)
        run.unexplained, run.explained = judgement.unexplained, judgement.explained
    return run


def message(run: CheckRun, rows: list[Row], check_id: str) -> str:
    """What a failing check run says: each pooled component beyond rounding, and how to run it again."""
    lines = [f"{rows[0].subject} {rows[0].check}: a systematic error beyond what rounding explains [{check_id}]"]
    lines += [f"  {comparison.problem}" for comparison in run.unexplained]
    lines += [
        f"  {comparison.problem}  [known divergence, line {entry.line}: {entry.reason}]"
        for comparison, entry in run.explained
    ]
    lines.append(
        f"  pooled over the {len({json.dumps(r.case, sort_keys=True) for r in rows if not r.failed})} distinct cases "
        "that passed their bound; the pooled error of a correct layer exceeds "
        f"{systematic.THRESHOLD:.3g} scales with probability below {systematic.LEVEL:g} (docs/systematic-error.md)"
    )
    lines.append(f"  replay: pytest 'conformance/{check_id}' with the same --hypothesis-profile and seed")
    return "\n".join(lines)
