"""Work done once per case: what is computed from a case is kept with it, and goes when it goes.

Several checks may meet the same case object (the same-case benchmark; the studies, which run every
check of a family on each case; a failure's diagnosis after its check): the oracle's formulas, and
each side's layer run in eval mode, are then computed once. Cases compare by identity, so a case
drawn again is a new case. What is kept lives in the case's own ``__dict__`` (as `functools.cached_property`
keeps its values, which a frozen dataclass allows), so it is freed with the case even where it refers back
to it; `dataclasses.replace` makes a case that keeps nothing. What is kept is shared: memoize only what
its callers never modify (the oracle's `Tracked` values are never changed in place).
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

R = TypeVar("R")
KEPT = "_kept"


def kept(case: object) -> dict:
    """What has been computed from `case` so far, by (function, arguments)."""
    return vars(case).setdefault(KEPT, {})


def once_per_case(function: Callable[..., R]) -> Callable[..., R]:
    """``function(case, *arguments)`` computed once per case and (hashable) arguments."""

    @functools.wraps(function)
    def once(case: object, *arguments: Any) -> R:
        table = kept(case)
        key = (function, arguments)
        if key not in table:
            table[key] = function(case, *arguments)
        return table[key]

    return once


C = TypeVar("C")
L = TypeVar("L")


class LayerRun(Generic[C, L]):
    """One side's layer for one case, in eval mode, built when a check first needs it and merged once.

    Checks that only call the layer share it; merging may change the layer it merges (peft's ``merge()``
    does), so the merged layer is kept and a check that asks for the layer after that gets a new one.
    Checks that train or change a layer (gradients, dropout) build their own. It holds its case weakly:
    a case that kept a run holding it would wait for the cyclic garbage collector, layers and all.
    """

    def __init__(self, case: C, build: Callable[[C], L], merge: Callable[[L], L]) -> None:
        self._case = weakref.ref(case)
        self._build, self._merge = build, merge
        self._layer: L | None = None
        self._merged: L | None = None

    def layer(self) -> L:
        if self._layer is None:
            self._layer = self._build(self._case())
        return self._layer

    def merged(self) -> L:
        if self._merged is None:
            layer, self._layer = self.layer(), None
            self._merged = self._merge(layer)
        return self._merged
