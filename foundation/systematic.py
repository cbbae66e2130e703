"""Systematic error: a verdict beside the bound, for errors too small for any one element to show.

The bound (`foundation.verdict`) holds every element to the worst case of rounding, so an error below that worst
case passes however consistently it is made. A wrong scale, a small term dropped, a precision lost on the way are
systematic: the error follows one term of the formula in every element of every case. Rounding, in the model of
Higham and Mary (SIAM J. Sci. Comput. 41, 2019), is not: each rounding is an independent error of mean zero within
its bound.

For one quantity of one case and one term t of its formula (the oracle names them: `Tracked.terms`), the error's
component along t is the weighted least-squares coefficient of e = observed - exact on t,

    c = sum(w t e) / sum(w t^2),   w = 1 / allowed^2,

which is 0.01 where the term is 1% too large. Under the model, c is a sum of independent bounded errors of mean
zero; one backward pass through the formula (`foundation.rounding_model`: each step's `Origin`, its adjoint and its
own roundings; of a formula in several orders, the costliest order's own) gives c's sub-Gaussian scale sigma, so
that P(|c| >= k sigma) <= 2 exp(-k^2 / 2) (Hoeffding's lemma and inequality), to first order in the unit roundoff.
The scale is multiplied by `CALIBRATION`, as the bound is, for orders the oracle does not spell out. What need not
average out is an interval [low, high] instead: subnormals flushed to zero (their bounds, either way), a Python
constant an implementation may round to the dtype first (the scale: that rounding or none, so one-sided), and a small
addend rounded away where it is added to a value on the dtype's grid (it may shrink, never grow: `Origin.addend`).

A check run's cases are independent draws: their coefficients pool, each case weighted by 1 / (THRESHOLD sigma + h)^2
(h: its interval's half width), to a coefficient of scale sqrt(sum w^2 sigma^2) / sum w, the intervals pooled alike.
The run fails where the pooled coefficient lies more than `THRESHOLD` scales outside the pooled interval, which, where
the model holds, a correct implementation does with probability at most `LEVEL` per quantity and term; or where its
worst case alone lies beyond `case_threshold` (each case a test at `LEVEL` / cases).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from foundation.rounding_model import rounding_model
from foundation.verdict import CALIBRATION, Tracked

LEVEL = 1e-7
"""The false-alarm probability of one pooled statistic (one check run, quantity and term) where the model holds."""
THRESHOLD = math.sqrt(2 * math.log(2 / LEVEL))
"""How many scales outside the interval a pooled coefficient may lie: 2 exp(-THRESHOLD^2 / 2) = LEVEL."""


@dataclass(frozen=True)
class Component:
    """The error's component along one term of one quantity, in one case."""

    quantity: str
    term: str
    coefficient: float
    """The least-squares coefficient of (observed - exact) on the term: 0.01 for a term 1% too large."""
    scale: float
    """The sub-Gaussian scale of the coefficient under the rounding model."""
    low: float
    high: float
    """What rounding may add to the coefficient without averaging out: underflow, a rounded constant."""

    def to_json(self) -> dict:
        return {name: getattr(self, name) for name in ("quantity", "term", "coefficient", "scale", "low", "high")}

    @property
    def statistic(self) -> float:
        """How many scales the coefficient lies outside [low, high] (0 inside)."""
        return _beyond(self.coefficient, self.scale, self.low, self.high)


def _beyond(coefficient: float, scale: float, low: float, high: float) -> float:
    outside = max(coefficient - high, low - coefficient, 0.0)
    return outside / scale if scale > 0 else (math.inf if outside else 0.0)


def case_threshold(cases: int) -> float:
    """How many scales outside its interval the worst of `cases` cases may lie: each case is a test of its own, at
    `LEVEL` / `cases` (Bonferroni), so that a run's worst case is a false alarm with probability at most `LEVEL`."""
    return math.sqrt(2 * math.log(2 * max(cases, 1) / LEVEL))


def components(quantity: str, observed: np.ndarray, expected: Tracked) -> list[Component]:
    """The error's component along each term the oracle names for `expected` (none where it names none, or where no
    element both carries the term and allows an error, or the model does not hold)."""
    allowed = expected.allowed
    judgeable = (allowed > 0) & np.isfinite(allowed) & np.isfinite(observed)
    terms, seeds = [], []
    for term, direction in (expected.terms or {}).items():
        judged = judgeable & (direction != 0)
        if not judged.any():
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            weights = np.where(judged, direction / np.square(allowed), 0.0)
        norm = float(np.sum(weights * direction))
        if math.isfinite(norm) and norm > 0:
            terms.append(term)
            seeds.append(weights / norm)
    if not seeds:
        return []
    with np.errstate(invalid="ignore"):
        error = np.where(judgeable, observed - expected.value, 0.0)
    coefficients = np.stack(seeds).reshape(len(seeds), -1) @ error.reshape(-1)
    found = []
    for term, coefficient, model in zip(terms, coefficients, rounding_model(expected, np.stack(seeds))):
        if model is not None:
            variance, low, high = model
            scale = CALIBRATION * math.sqrt(variance)
            found.append(Component(quantity, term, float(coefficient), scale, CALIBRATION * low, CALIBRATION * high))
    return found


@dataclass(frozen=True)
class Pooled:
    """One quantity's component along one term over the cases of a check run."""

    quantity: str
    term: str
    adapter_dtype: str
    """The cases' adapters' dtype: each is pooled apart (a float32 adapter's coefficients are far more precise, and
    would outweigh a half-precision adapter's error)."""
    cases: int
    coefficient: float
    scale: float
    low: float
    high: float
    worst_case: float = 0.0
    """The largest case's own statistic: where the error's size or sign changes from case to case (a scale rounded
    differently for each alpha / r), the pooled coefficient may average it away, and one case may still show it."""
    worst_coefficient: float = 0.0
    worst_scale: float = 0.0

    @property
    def statistic(self) -> float:
        """How many scales the pooled coefficient lies outside [low, high] (0 inside)."""
        return _beyond(self.coefficient, self.scale, self.low, self.high)

    @property
    def passed(self) -> bool:
        return self.statistic <= THRESHOLD and self.worst_case <= case_threshold(self.cases)

    @property
    def detectable(self) -> float:
        """The smallest relative error of the term that this run would have caught, either way: scaling the term by
        1 + e moves every case's coefficient, and so the pooled one, by e (a bound that a case fails first only
        catches it sooner)."""
        return THRESHOLD * self.scale + max(self.high - self.coefficient, self.coefficient - self.low)

    def to_json(self) -> dict:
        fields = ("quantity", "term", "adapter_dtype", "cases", "coefficient", "scale", "low", "high", "worst_case")
        statistic = self.statistic
        return {
            **{name: getattr(self, name) for name in fields},
            "statistic": statistic if statistic < math.inf else None,
        }

    def describe(self) -> str:
        """``the LoRA term is 1.0102x the oracle's +- 0.0007 across 150 cases``."""
        return (
            f"{self.term} of {self.quantity} is {1 + self.coefficient:.5g}x the oracle's ± {self.scale:.2g} across "
            f"{self.cases} cases with {self.adapter_dtype} adapters (rounding explains {1 + self.low:.5g}x to "
            f"{1 + self.high:.5g}x; {self.statistic:.3g} scales beyond, allowed {THRESHOLD:.3g})"
            + (
                ""
                if self.worst_case <= case_threshold(self.cases)
                else f"; in one case it is {1 + self.worst_coefficient:.5g}x ± {self.worst_scale:.2g} "
                f"({self.worst_case:.3g} scales beyond, allowed {case_threshold(self.cases):.3g} for the worst of "
                f"{self.cases} cases)"
            )
        )


@dataclass
class Sums:
    """What pooling needs of the cases of one quantity, term and adapter dtype: sums that add up across processes.

    Each case weighs ``1 / (THRESHOLD scale + half_width)^2`` (its interval's half width): the inverse square of what
    it alone could tell apart from rounding, so that a case whose rounding may be systematic (a term that vanishes
    below half an ulp) counts for less. The weights do not depend on the errors, so
    the pooled coefficient's scale is ``sqrt(sum w^2 scale^2) / sum w`` and the pooled interval the weighted one."""

    cases: int = 0
    weight: float = 0.0
    variance: float = 0.0
    """The sum of weight^2 scale^2."""
    coefficient: float = 0.0
    low: float = 0.0
    high: float = 0.0
    worst: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """The case with the largest statistic: (statistic, coefficient, scale)."""

    def add(self, component: Component) -> None:
        """One case's component; a case without rounding noise along the term (an exact term) adds nothing: the
        bound alone judges it."""
        if not (component.scale > 0 and math.isfinite(component.scale)):
            return
        half_width = (component.high - component.low) / 2
        weight = 1 / (THRESHOLD * component.scale + half_width) ** 2
        self.cases += 1
        self.weight += weight
        self.variance += (weight * component.scale) ** 2
        self.coefficient += weight * component.coefficient
        self.low += weight * component.low
        self.high += weight * component.high
        if component.statistic > self.worst[0]:
            self.worst = (component.statistic, component.coefficient, component.scale)

    def merged(self, other: Sums) -> Sums:
        fields = ("cases", "weight", "variance", "coefficient", "low", "high")
        sums = (getattr(self, f) + getattr(other, f) for f in fields)
        return Sums(*sums, worst=max(tuple(self.worst), tuple(other.worst)))

    def pooled(self, quantity: str, term: str, adapter_dtype: str) -> Pooled | None:
        if not self.cases:
            return None
        total = self.weight
        return Pooled(
            quantity,
            term,
            adapter_dtype,
            self.cases,
            self.coefficient / total,
            math.sqrt(self.variance) / total,
            self.low / total,
            self.high / total,
            *self.worst,
        )


def stratum(case: dict, component: Component) -> tuple[str, str, str]:
    """What a case's component pools with: the same quantity and term, of cases whose adapters have its dtype."""
    return component.quantity, component.term, case.get("adapter_dtype", "")


def pool_rows(rows: Iterable) -> list[Pooled]:
    """A check run's pooled components from its rows (`schema.Row`): those of the rows that passed."""
    return pool_cases((row.case, row.components) for row in rows if not row.failed)


def pool_cases(cases: Iterable[tuple[dict, list[dict]]]) -> list[Pooled]:
    """Each case's components (its description, and `Component.to_json` of each) pooled per quantity, term and
    adapter dtype, each distinct case counted once (a case drawn twice is not an independent draw)."""
    seen: set[str] = set()
    sums: dict[tuple[str, str, str], Sums] = defaultdict(Sums)
    for case, written in cases:
        key = json.dumps(case, sort_keys=True)
        if not written or key in seen:
            continue
        seen.add(key)
        for found in (Component(**component) for component in written):
            sums[stratum(case, found)].add(found)
    pooled = (found.pooled(*key) for key, found in sums.items())
    return [p for p in pooled if p is not None]
