"""Work done once per case: what is computed from a case is kept with it, and goes when it goes.

Several checks may meet the same case object (the same-case benchmark; the studies, which run every
check of a family on each case; a failure's diagnosis after its check; the subjects of one check, whose
tests draw the same cases, while the plugin keeps them in one scope, `share_cases`): the oracle's
formulas, the reference's judgment and each side's layer run in eval mode are then computed once. Cases
compare by identity, so a case drawn again outside a scope is a new case. What is kept lives in the
case's own ``__dict__`` (as `functools.cached_property` keeps its values, which a frozen dataclass
allows), so it is freed with the case even where it refers back to it; `dataclasses.replace` makes a
case that keeps nothing. What is kept is shared: memoize only what its callers never modify (the
oracle's `Tracked` values are never changed in place; a case's arrays are read-only)."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

R = TypeVar("R")
KEPT = "_kept"


def kept(case: object) -> dict:
    """What has been computed from `case` so far, by (function, arguments)."""
    return vars(case).setdefault(KEPT, {})


def forget(case: object) -> None:
    """Drop what has been computed from `case`. A case may outlive its use in a reference cycle (Hypothesis's
    draw holds the frames that hold it), where the oracle's graphs it kept, gigabytes for a large switch case,
    would wait for the cyclic garbage collector; whoever is done with a case says so."""
    getattr(case, "__dict__", {}).pop(KEPT, None)


def once(case: object, key: Hashable, compute: Callable[[], R]) -> R:
    """``compute()``, computed once per case and `key`."""
    table = kept(case)
    if key not in table:
        table[key] = compute()
    return table[key]


def once_per_case(function: Callable[..., R]) -> Callable[..., R]:
    """``function(case, *arguments)`` computed once per case and (hashable) arguments."""

    @functools.wraps(function)
    def computed_once(case: object, *arguments: Any) -> R:
        return once(case, (function, arguments), lambda: function(case, *arguments))

    return computed_once


# Cases built once while a scope lasts -----------------------------------------------------------

_scope: Hashable | None = None
_built: dict[Hashable, Any] = {}


def share_cases(scope: Hashable | None) -> None:
    """From now on, a case drawn with the parameters of one drawn earlier in `scope` is that same case object,
    with what was computed from it (`built_once`); a new scope drops what the last one kept; None shares nothing.

    The tests of one check and dtype draw the same cases for every subject (the plugin seeds them alike), so the
    plugin gives each such group a scope: a case is built, and its oracle and reference computed, once for all
    the subjects.
    """
    global _scope, _built
    if scope != _scope or scope is None:
        for built in _built.values():
            forget(built)
        _scope, _built = scope, {}


def built_once(parameters: Hashable, build: Callable[[], R]) -> R:
    """The case (or whatever `build` makes of them) for `parameters`: built once in the current scope, and every
    time where none is open (`share_cases`)."""
    if _scope is None:
        return build()
    if parameters not in _built:
        _built[parameters] = build()
    return _built[parameters]


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
