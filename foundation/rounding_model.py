"""The first-order rounding model of a linear functional of a `Tracked` value's error: one backward pass.

Each `Tracked` value keeps how it was computed (`verdict.Origin`): its operands, the adjoint of the exact map
(`pullback`) and what its own step may add, a variance proxy for the independent roundings (Higham and Mary, SIAM J.
Sci. Comput. 41, 2019) and what need not average out (underflow, a rounded constant, a swamped addend). For a
functional ``sum(seed * error)``, carrying the seed back from the result to the inputs charges every step with its
own roundings times its adjoint: a variance proxy, and an interval [low, high].

Where a value is one formula in several orders (`Tracked.covering`), an implementation takes one of them. Each
order's own steps (those no other value uses) are carried apart and the costliest order is charged; what the orders
share is charged once, with the adjoint of the first order (every order computes the same exact map, so the adjoint
of a shared operand is the same through each). Where the orders' steps cannot be told apart so (an order used
elsewhere too, or an operand only a later order reaches), every order is charged with the whole adjoint, which
overstates, never understates.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass

import numpy as np

from foundation.verdict import Tracked


def _upstream_first(root: Tracked) -> list[Tracked]:
    """Every value `root` was computed from, each before those it was computed from."""
    finished: list[Tracked] = []
    seen: set[int] = set()
    stack: list[tuple[Tracked, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            finished.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if node.origin is not None:
            stack += [(source, False) for source in _sources(node)]
    return finished[::-1]


def _sources(node: Tracked) -> tuple[Tracked, ...]:
    return (*node.origin.parents, *node.origin.orders) if node.origin is not None else ()


def _totals(values: np.ndarray) -> np.ndarray:
    """Each row's sum (over every axis but the leading one)."""
    return values.reshape(len(values), -1).sum(axis=1)


def _charged(change: np.ndarray, per_element: np.ndarray | float, squared: bool = False) -> np.ndarray | float:
    """Each row's sum of ``|change| * per_element``, or (`squared`) of ``change^2 * per_element``; nothing where the
    change is 0, whatever `per_element` (an infinite bound moves nothing there). Within ``np.errstate(invalid=...)``."""
    if np.ndim(per_element) == 0 and per_element == 0:
        return 0.0
    charged = (np.square(change) if squared else np.abs(change)) * per_element
    totals = _totals(charged)
    if np.isnan(totals).any():  # 0 * inf
        totals = _totals(np.where(change != 0, charged, 0.0))
    return totals


@dataclass
class _Charges:
    """What a backward pass has charged, one entry per functional."""

    variance: np.ndarray
    bias: np.ndarray
    low: np.ndarray
    high: np.ndarray
    holds: np.ndarray
    """Whether the first-order model holds: False where an adjoint is not finite."""

    @classmethod
    def none(cls, rows: int) -> _Charges:
        return cls(*(np.zeros(rows) for _ in range(4)), np.ones(rows, dtype=bool))

    def add_costliest(self, alternatives: list[_Charges]) -> None:
        """Charge whichever alternative costs most, each figure on its own: one order of several is taken."""
        self.variance += np.max([a.variance for a in alternatives], axis=0)
        self.bias += np.max([a.bias for a in alternatives], axis=0)
        self.low += np.min([a.low for a in alternatives], axis=0)
        self.high += np.max([a.high for a in alternatives], axis=0)
        self.holds &= np.all([a.holds for a in alternatives], axis=0)

    def step(self, node: Tracked, change: np.ndarray) -> None:
        """Charge `node`'s own step (an input's bound, where it has one) with its adjoint `change`."""
        origin = node.origin
        if origin is None:  # an input: exact, or (made without an origin) off by its bound either way
            self.bias += _charged(change, node.bound)
            return
        self.variance += _charged(change, origin.variance, squared=True)
        self.bias += _charged(change, origin.bias)
        if origin.constant is not None:
            moved = _totals(change * origin.constant)
            self.low += np.minimum(moved, 0.0)
            self.high += np.maximum(moved, 0.0)
        if origin.swamped is not None:  # a small addend rounded away: it shrinks, never grows (`Origin.addend`)
            self._shrinks(change, origin.addend, origin.swamped)
        if origin.underflowed is not None:  # a value rounded on the subnormal grid: it too may only shrink
            self._shrinks(change, node.value, origin.underflowed)

    def _shrinks(self, change: np.ndarray, direction: np.ndarray, by: np.ndarray) -> None:
        """What a value that may shrink toward 0 (never grow) along `direction`, by up to `by`, moves."""
        shrinking = np.abs(change) * by
        along = change * direction > 0
        self.low -= _totals(np.where(along, shrinking, 0.0))
        self.high += _totals(np.where(along, 0.0, shrinking))


@dataclass
class _Arrivals:
    """The changes that reached the operands of a region's steps: per value, its accumulated change (None where only
    edges were counted) and how many of its uses delivered it."""

    nodes: dict[int, Tracked]
    changes: dict[int, np.ndarray | None]
    edges: Counter


class _Graph:
    """One backward pass over everything a root was computed from."""

    def __init__(self, root: Tracked, rows: int):
        self.order = _upstream_first(root)
        self.position = {id(node): i for i, node in enumerate(self.order)}
        self.uses: Counter = Counter(id(source) for node in self.order for source in _sources(node))
        self.rows = rows
        self._ancestry: dict[int, int] | None = None

    def ancestors(self, node: Tracked) -> int:
        """The values `node` was computed from, as a bit set of their positions."""
        if self._ancestry is None:
            self._ancestry = {}
            for i, each in reversed(list(enumerate(self.order))):
                bits = 0
                for source in _sources(each):
                    bits |= self._ancestry[id(source)] | (1 << self.position[id(source)])
                self._ancestry[id(each)] = bits
        return self._ancestry[id(node)]

    def carry(self, start: Tracked, change: np.ndarray, charges: _Charges, region: bool) -> _Arrivals:
        """Carry `change` of `start` back, charging each step reached; where `region`, only through the steps that
        `start`'s region alone uses (all of whose uses lie in it), returning what reaches the others."""
        arrivals = _Arrivals({id(start): start}, {id(start): change}, Counter())
        queue = [(self.position[id(start)], id(start))]
        left = _Arrivals({}, {}, Counter())
        while queue:
            _, key = heapq.heappop(queue)
            node, change = arrivals.nodes[key], arrivals.changes.pop(key)
            if region and node is not start and arrivals.edges[key] < self.uses[key]:
                left.nodes[key], left.changes[key], left.edges[key] = node, change, arrivals.edges[key]
                continue
            if change is None:
                continue
            for source, part, edges in self._visit(node, change, charges):
                source_key = id(source)
                if source_key not in arrivals.nodes or source_key not in arrivals.changes:
                    arrivals.nodes[source_key] = source
                    arrivals.changes[source_key] = part
                    heapq.heappush(queue, (self.position[source_key], source_key))
                elif part is not None:
                    before = arrivals.changes[source_key]
                    arrivals.changes[source_key] = part if before is None else before + part
                arrivals.edges[source_key] += edges
        return left

    def _visit(self, node: Tracked, change: np.ndarray, charges: _Charges):
        """Charge one step and yield what moves on: (operand, its change or None, uses delivered)."""
        if not np.isfinite(change).all():
            finite = np.isfinite(change).reshape(self.rows, -1).all(axis=1)
            charges.holds &= finite
            change = np.where(finite.reshape(-1, *[1] * (change.ndim - 1)), change, 0.0)
        charges.step(node, change)
        origin = node.origin
        if origin is None:
            return
        if origin.pullback is not None:
            yield from ((source, part, 1) for source, part in zip(origin.parents, origin.pullback(change)))
        if origin.orders:
            yield from self._orders(node, change, charges)

    def _orders(self, node: Tracked, change: np.ndarray, charges: _Charges):
        """A formula in several orders (see the module's docstring): each order's own steps apart, the costliest
        charged, and what they share moved on once; else every order with the whole change."""
        orders = node.origin.orders
        if all(self.uses[id(order)] == sum(o is order for o in orders) for order in orders):
            alternatives = [_Charges.none(self.rows) for _ in orders]
            reached = [self.carry(order, change, each, region=True) for order, each in zip(orders, alternatives)]
            first = reached[0]
            carried = 0
            for key, each in first.nodes.items():
                carried |= (1 << self.position[key]) | self.ancestors(each)
            if all(carried >> self.position[key] & 1 for later in reached[1:] for key in later.nodes):
                charges.add_costliest(alternatives)
                for later in reached[1:]:
                    for key, source in later.nodes.items():
                        if key not in first.nodes:
                            yield source, None, later.edges[key]
                for key, source in first.nodes.items():
                    yield source, first.changes[key], sum(r.edges[key] for r in reached)
                return
        yield from ((order, change, 1) for order in orders)


def rounding_model(root: Tracked, seeds: np.ndarray) -> list[tuple[float, float, float] | None]:
    """For each linear functional ``sum(seed * error of root)``, one per row of `seeds`: its variance proxy under the
    model, and the interval [low, high] of what may not average out; None where the first-order model does not hold
    (a non-finite adjoint). One backward pass carries them all."""
    rows = len(seeds)
    charges = _Charges.none(rows)
    with np.errstate(invalid="ignore"):
        _Graph(root, rows).carry(root, np.asarray(seeds, dtype=np.float64), charges, region=False)
    c = charges
    holds = c.holds & np.isfinite(c.variance) & np.isfinite(c.bias) & np.isfinite(c.low) & np.isfinite(c.high)
    return [
        (float(v), float(lo - b), float(hi + b)) if held else None
        for held, v, b, lo, hi in zip(holds, c.variance, c.bias, c.low, c.high)
    ]
