"""The verdict: how much error rounding can explain, and whether an observed result stays within it.

The allowed error is not a tolerance pair. It is a running error bound, carried through the same
formula the oracle evaluates: every `Tracked` value holds the exact float64 result of the formula and
a per-element bound on how far an implementation working in the case's dtype may be from it. Each
operation adds the textbook bound of one floating-point step (Higham, *Accuracy and Stability of
Numerical Algorithms*, ch. 3):

- a product with inner dimension ``n``, accumulated in float32 (`dtypes.ACCUMULATION`), is off by at
  most ``gamma(n) * |a| @ |b|`` with ``gamma(n) = n u / (1 - n u)``;
- every result stored in the case dtype costs one more rounding: ``u * |result|``;
- multiplying by a Python scalar may round the scalar to the dtype first: one more ``u`` (none where the
  dtype holds the scalar, and no rounding at all for a power of two, which scales exactly).

Input errors are propagated exactly (``|a| @ e_b + e_a @ |b| + e_a @ e_b``). The bound is therefore
the sum of magnitudes ``|x| |W|^T``, ``|b|``, ``s |x| |A|^T |B|^T`` times factors that grow with the
inner dimension, plus the roundings at each cast, as DESIGN.md asks. It is rigorous for the
evaluation order the oracle spells out; `CALIBRATION` is the one constant that lets another sensible
order (say ``x @ (s B A)^T`` instead of ``s ((x A^T) B^T)``) through. Every rounding may also
underflow, which costs up to half the dtype's smallest subnormal in absolute terms (a product's sum:
once per product, in the accumulation dtype); where the dtype's dot products flush subnormals to zero
(bfloat16's instructions do), a subnormal operand, product, partial sum or result of a dot product may
become zero, which costs up to the smallest normal number instead.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from foundation.dtypes import ACCUMULATION, DType, promoted, round_to

CALIBRATION = 2.0
"""The one calibrated constant: the bound of the oracle's evaluation order, times this, is allowed.

Measured (see ``tests/meta_tests``): correct implementations use at most ~0.5 of the bound with
this constant, and a factor 2 covers any reordering of a sum of two or three terms.
"""


def gamma(inner: int, accumulation: DType = ACCUMULATION) -> float:
    """Worst-case relative error of a sum of `inner` products accumulated in `accumulation`."""
    nu = inner * accumulation.unit_roundoff
    return nu / (1.0 - nu) if nu < 1 else float("inf")


@functools.cache
def scaling_roundings(factor: float, dtype: DType) -> int:
    """How many roundings multiplying a number of `dtype` by the Python float `factor` may take: 2 where the
    factor must itself be rounded to the dtype first, 1 where the dtype holds it exactly (the product's
    rounding), 0 for a power of two, whose products are exact (but for underflow): peft's default
    alpha = r scales by 1, mlx-vlm's alpha = 2 r by 2."""
    if math.frexp(abs(factor))[0] == 0.5:
        return 0
    return 1 if float(round_to(np.array([factor]), dtype)[0]) == factor else 2


Pullback = Callable[[np.ndarray], tuple[np.ndarray, ...]]
"""The adjoint of an exact map: changes of its result (one per row of a leading axis) moved onto its operands."""


@dataclass(frozen=True, eq=False)
class Origin:
    """How a `Tracked` value was computed, for the first-order rounding model of `foundation.systematic`: the
    operands, how a change of the result moves back onto them (`pullback`, the adjoint of the exact map), and what
    this one step may add to each element of the result. Where the bound adds the worst case of every rounding,
    the model takes each rounding as an independent error of mean zero within it (Higham and Mary, "A new approach
    to probabilistic rounding error analysis", SIAM J. Sci. Comput. 41, 2019), but for the errors that need not
    average out: underflow, a subnormal read as zero, and a Python constant rounded to the dtype."""

    parents: tuple[Tracked, ...] = ()
    pullback: Pullback | None = None
    variance: np.ndarray | float = 0.0
    """The variance proxy of this step's independent roundings: the sum of their bounds' squares."""
    bias: np.ndarray | float = 0.0
    """A bound on this step's errors that may not average out (underflow, subnormals read as zero)."""
    constant: np.ndarray | None = None
    """How the result moves where an implementation rounds a Python constant (the scale) to the dtype first: one
    rounding shared by every element, which an implementation makes or does not; and where products that share a
    factor are each rounded once, which lean with that factor (`_products_rounding`, `_single_products_rounding`)."""
    orders: tuple[Tracked, ...] = ()
    """One formula evaluated in several orders (`Tracked.covering`): an implementation takes one of them."""
    addend: np.ndarray | None = None
    """Where the result is a sum: its smaller addend t (signed). Rounding ``g + t`` where g lies on the dtype's grid
    (an input, or a result already stored) is rounding t alone, to t - r with |r| <= rounding, and the error's part
    along t does not average out: -r t = -(m ulp + r) r, whose -r^2 never has t's sign (all of t vanishes where
    |t| < ulp / 2). `swamped` bounds that part, ``r^2 / |t| <= min(|t|, rounding^2 / |t|)`` per element: the error of
    the sum (or of its cast, where it is first rounded there) may shrink t by that much, never grow it."""
    swamped: np.ndarray | None = None
    underflowed: np.ndarray | None = None
    """Where the result may be rounded on the subnormal grid (spacing twice the dtype's `underflow`): that rounding is
    a swamping too, of the whole value v on the grid of 0, so it may shrink v, never grow it, by up to
    ``min(|v|, underflow^2 / |v|)`` per element (all of v where ``|v|`` is below half the smallest subnormal, which
    rounds to 0)."""


def _unbroadcast(change: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A change of a broadcast result moved back onto an operand of `shape`: summed over what was broadcast. Every
    change has one leading axis more than its value, one row per functional (`foundation.systematic`), kept."""
    extra = change.ndim - 1 - len(shape)
    if extra > 0:
        change = change.sum(axis=tuple(range(1, 1 + extra)))
    axes = tuple(1 + axis for axis, size in enumerate(shape) if size == 1 and change.shape[1 + axis] != 1)
    return change.sum(axis=axes, keepdims=True) if axes else change


def _is_basic(index) -> bool:
    """Whether an index takes a view (slices, integers, None, Ellipsis) rather than a gather."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(part is None or part is Ellipsis or isinstance(part, (slice, int, np.integer)) for part in parts)


def _scattered(shape: tuple[int, ...], index, change: np.ndarray) -> np.ndarray:
    """The adjoint of ``array[index]``: `change` (with its leading axis of functionals) added back where each element
    was taken from."""
    whole = np.zeros((len(change), *shape))
    every = (slice(None), *(index if isinstance(index, tuple) else (index,)))
    if _is_basic(index):
        whole[every] += change
    else:
        np.add.at(whole, every, change)
    return whole


def _swamped(size: np.ndarray, rounding: np.ndarray | float) -> np.ndarray:
    """How much rounding a value of magnitude `size` onto a grid of half-spacing `rounding` (where a point of the grid
    lies within `size` of it) may shrink it: ``min(size, rounding^2 / size)`` (see `Origin.addend`)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(size > 0, np.minimum(size, np.square(rounding) / size), 0.0)


def _underflowed(value: np.ndarray, lost: np.ndarray | float) -> np.ndarray | None:
    """`Origin.underflowed` of a value stored on the subnormal grid where it may lose up to `lost` (None nowhere)."""
    return _swamped(np.abs(value), lost) if np.any(lost) else None


def _nonnegative_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a @ b`` of non-negative bounds, where an unbounded error (inf) times an exact 0 adds nothing (not NaN)."""
    if np.isfinite(a).all() and np.isfinite(b).all():
        return a @ b
    unbounded_a, unbounded_b = np.isinf(a), np.isinf(b)
    finite = np.where(unbounded_a, 0.0, a) @ np.where(unbounded_b, 0.0, b)
    reaches = unbounded_a.astype(float) @ (b > 0).astype(float) + (a > 0).astype(float) @ unbounded_b.astype(float)
    return np.where(reaches > 0, np.inf, finite)


def _products_rounding(factor: float, value: np.ndarray, dtype: DType) -> np.ndarray:
    """How rounding ``factor * v`` to `dtype` moves each product, v being `value` as `dtype` holds it. One factor
    multiplies every element, so these roundings need not be independent of v: where the factor has few significant
    bits, the exact products' low bits follow v's, and their roundings lean one way along v (bfloat16's sqrt(63),
    rsLoRA's scale at r = 63, rounded to 127/16: +2.9e-4 of v on normal values, 0.08 of a unit roundoff, found by the
    false-alarm study of switch layers). Computed exactly where the operand is known, it is charged like a rounded
    constant (`Origin.constant`): an implementation that multiplies in `dtype` makes it, one that multiplies in a
    finer dtype does not."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _rounding_of(factor * round_to(value, dtype), dtype)


def _single_products_rounding(a: np.ndarray, b: np.ndarray, dtype: DType) -> np.ndarray:
    """How rounding each element of ``a @ b`` to `dtype` moves it, where each is one product (an inner size of 1)
    of `a` and `b` as `dtype` holds them: every element of a row shares its factor of `a`, every element of a column
    its factor of `b`, so, as a scale's products do (`_products_rounding`), their roundings lean one way along the
    result (a bfloat16 factor of mantissa 255/128 rounds every product toward 0: -0.44 of a unit roundoff along
    them; found by the false-alarm study of the embedding's extremes, ``as_linear`` with one dimension). Computed
    exactly (two such factors multiply exactly in float64) and charged like a rounded constant: an implementation
    that stores the products in `dtype` makes it, one that keeps them finer does not."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _rounding_of(round_to(a, dtype) @ round_to(b, dtype), dtype)


def _elementwise_products_rounding(a: Tracked, b: Tracked, dtype: DType) -> np.ndarray:
    """How rounding each element of ``a * b`` to `dtype` moves it, `a` and `b` as their dtypes hold them: a broadcast
    factor (DoRA's ``m / ||W + s B A||``, one per column) is shared by every product it makes, whose roundings then
    lean one way along them, as in `_single_products_rounding` (a bfloat16 column of 3,904 values times a factor of
    mantissa 255/128: 13.8 of the model's scales). Exact in float64 (two float32 significands fit); charged like a
    rounded constant, so an implementation that multiplies in a finer dtype is explained too."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _rounding_of(round_to(a.value, a.dtype) * round_to(b.value, b.dtype), dtype)


def _rounding_of(exact: np.ndarray, dtype: DType) -> np.ndarray:
    """``round_to(exact, dtype) - exact`` where it is finite, and 0 where it is not (an overflow, ``0 * inf``): not
    charged. Within ``np.errstate(invalid=..., over=...)``."""
    moved = round_to(exact, dtype) - exact
    return np.where(np.isfinite(moved), moved, 0.0)


def _smaller(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Per element, whichever of two addends is smaller in magnitude (with its sign)."""
    a, b = np.broadcast_to(a, shape), np.broadcast_to(b, shape)
    return np.where(np.abs(a) <= np.abs(b), a, b)


@dataclass(frozen=True)
class _Lost:
    noise: float
    bias: float


def _underflows(count: int, each: float, flushed: bool) -> _Lost:
    """`count` roundings that may each lose up to `each` to underflow: flushed to zero, they need not average out
    (a bias of count * each); rounded to the nearest, they are independent (noise of scale sqrt(count) * each)."""
    return _Lost(0.0, count * each) if flushed else _Lost(math.sqrt(count) * each, 0.0)


def _underflowing(magnitude: np.ndarray, dtype: DType, underflow: float) -> np.ndarray | float:
    """`underflow` where a result stored in `dtype`, of at most `magnitude` (its value's plus its bound), may lie
    below its smallest normal number, else 0: above it, a rounding is relative, and no absolute error is left over."""
    if not (magnitude.size and magnitude.min() < dtype.smallest_normal):
        return 0.0
    return np.where(magnitude < dtype.smallest_normal, underflow, 0.0)


def _matmul_pullback(a: np.ndarray, b: np.ndarray, change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The adjoint of ``a @ b`` (numpy's rules: a vector operand is a row of `a`, a column of `b`), for a `change`
    with a leading axis of functionals."""
    rows, columns = a[None, :] if a.ndim == 1 else a, b[:, None] if b.ndim == 1 else b
    change = change[..., None] if b.ndim == 1 else change
    change = change[..., None, :] if a.ndim == 1 else change
    onto_a = _unbroadcast(change @ np.swapaxes(columns, -1, -2), rows.shape)
    onto_b = _unbroadcast(np.swapaxes(rows, -1, -2) @ change, columns.shape)
    return onto_a.reshape(len(change), *a.shape), onto_b.reshape(len(change), *b.shape)


@dataclass(frozen=True)
class Tracked:
    """An exact float64 value and a bound on the error of computing it in `dtype`; how it was computed (`origin`),
    and, where the oracle names them, the terms of its formula (`terms`: ``"LoRA term"`` -> its exact values)."""

    value: np.ndarray
    bound: np.ndarray
    dtype: DType
    origin: Origin | None = field(default=None, compare=False, repr=False)
    terms: Mapping[str, np.ndarray] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def exact(cls, value: np.ndarray, dtype: DType) -> Tracked:
        """An input: exactly representable in `dtype`, so it carries no error."""
        value = np.asarray(value, dtype=np.float64)
        return cls(value, np.zeros_like(value), dtype)

    @classmethod
    def rounded(cls, value: np.ndarray, dtype: DType) -> Tracked:
        """An input that may or may not be rounded to `dtype` first, element by element (a quantized weight that
        may be dequantized on the fly)."""
        value = np.asarray(value, dtype=np.float64)
        rounding = dtype.unit_roundoff * np.abs(value)
        underflowing = _underflowing(np.abs(value) + rounding, dtype, dtype.underflow)
        origin = Origin(variance=np.square(rounding + underflowing), underflowed=_underflowed(value, underflowing))
        return cls(value, rounding + dtype.underflow, dtype, origin)

    def with_terms(self, terms: Mapping[str, np.ndarray]) -> Tracked:
        """This value, with the terms of its formula named: ``{"LoRA term": s (x A^T) B^T, ...}``."""
        return replace(self, terms={name: np.broadcast_to(term, self.value.shape) for name, term in terms.items()})

    def _carried(self, value: np.ndarray, bound: np.ndarray, dtype: DType, pullback: Pullback, move) -> Tracked:
        """A rearrangement of this value (no arithmetic): its terms rearranged alike by `move`."""
        terms = None if self.terms is None else {name: move(term) for name, term in self.terms.items()}
        return Tracked(value, bound, dtype, Origin((self,), pullback), terms)

    @staticmethod
    def covering(*orders: Tracked) -> Tracked:
        """One formula evaluated in several orders: the value, and a bound that covers each order (all of
        whose results are stored in one dtype)."""
        if any(order.dtype != orders[0].dtype for order in orders):
            raise ValueError(f"orders stored in different dtypes: {[order.dtype.name for order in orders]}")
        bound = np.maximum.reduce([order.bound for order in orders])
        terms = next((order.terms for order in orders if order.terms is not None), None)
        return Tracked(orders[0].value, bound, orders[0].dtype, Origin(orders=orders), terms)

    def narrowed_to(self, observed: np.ndarray, floor: Tracked) -> Tracked:
        """This bound, narrowed to how far `observed` (what a known kernel computed for this very formula and
        input) is off, where that lies within it; never below `floor`'s bound (another order's, which the
        narrowed bound must still cover). Where `observed` is off by more, the bound stays: that kernel fails."""
        with np.errstate(invalid="ignore"):  # inf - inf: a kernel off by everything, which keeps the worst case
            off = np.abs(observed - self.value)
        within = np.isfinite(off) & (off <= self.bound)
        bound = np.maximum(np.where(within, off, self.bound), floor.bound)
        return Tracked(self.value, bound, self.dtype, Origin(orders=(self, floor)), self.terms)

    @staticmethod
    def stack(parts: list[Tracked], axis: int = 0) -> Tracked:
        """Several results side by side (no arithmetic, so no error of its own)."""
        value = np.stack([part.value for part in parts], axis=axis)
        names = [list(part.terms or ()) for part in parts]
        terms = None
        if parts[0].terms is not None and all(set(n) == set(names[0]) for n in names):
            terms = {name: np.stack([part.terms[name] for part in parts], axis=axis) for name in names[0]}

        def pullback(change: np.ndarray) -> tuple[np.ndarray, ...]:
            along = axis + 1 if axis >= 0 else axis  # past the leading axis of functionals
            return tuple(np.take(change, i, axis=along) for i in range(len(parts)))

        bound = np.stack([part.bound for part in parts], axis=axis)
        return Tracked(value, bound, parts[0].dtype, Origin(tuple(parts), pullback), terms)

    def take_along_axis(self, indices: np.ndarray, axis: int) -> Tracked:
        """``np.take_along_axis`` of value and bound: a gather, exact."""
        take = np.take_along_axis
        shape = self.value.shape

        def pullback(change: np.ndarray) -> tuple[np.ndarray]:
            taken = change.shape[1:]
            where = list(np.indices(taken, sparse=True))
            where[axis] = np.broadcast_to(indices, taken)
            return (_scattered(shape, tuple(where), change),)

        return self._carried(
            take(self.value, indices, axis),
            take(self.bound, indices, axis),
            self.dtype,
            pullback,
            lambda term: take(term, indices, axis),
        )

    def reshape(self, *shape: int) -> Tracked:
        before = self.value.shape
        return self._carried(
            self.value.reshape(*shape),
            self.bound.reshape(*shape),
            self.dtype,
            lambda change: (change.reshape(len(change), *before),),
            lambda term: term.reshape(*shape),
        )

    def __getitem__(self, index) -> Tracked:
        shape = self.value.shape
        return self._carried(
            self.value[index],
            self.bound[index],
            self.dtype,
            lambda change: (_scattered(shape, index, change),),
            lambda term: term[index],
        )

    @property
    def T(self) -> Tracked:  # noqa: N802 - mirrors numpy
        def swap(array: np.ndarray) -> np.ndarray:
            return np.swapaxes(array, -1, -2)

        return self._carried(swap(self.value), swap(self.bound), self.dtype, lambda change: (swap(change),), swap)

    @functools.cached_property
    def allowed(self) -> np.ndarray:
        """`allowed_error`, computed once (a check compares both sides with one expected value)."""
        return CALIBRATION * self.bound

    @property
    def magnitude(self) -> np.ndarray:
        return np.abs(self.value) + self.bound

    def _stored(
        self,
        value: np.ndarray,
        bound: np.ndarray,
        origin: Origin,
        underflow: float | None = None,
        dtype: DType | None = None,
        addend: np.ndarray | None = None,
    ) -> Tracked:
        """The result of one operation (whose own errors before the result's rounding `origin` holds), rounded once
        to `dtype` (this value's, unless said otherwise), which may underflow, by `underflow`; where it is a sum, its
        smaller `addend` (see `Origin.addend`)."""
        dtype = self.dtype if dtype is None else dtype
        underflow = dtype.underflow if underflow is None else underflow
        magnitude = np.abs(value) + bound
        rounding = dtype.unit_roundoff * magnitude
        swamped = None if addend is None else _swamped(np.abs(addend), rounding)
        lost = _underflowing(magnitude, dtype, underflow)
        bias, variance, underflowed = origin.bias, origin.variance + np.square(rounding), None
        if underflow > dtype.underflow:  # flushed to zero: not a rounding to the nearest, so it need not average out
            bias = bias + lost
        elif np.any(lost):
            variance = variance + np.square(lost)
            underflowed = _underflowed(value, lost)
        origin = Origin(
            parents=origin.parents,
            pullback=origin.pullback,
            variance=variance,
            bias=bias,
            constant=origin.constant,
            orders=origin.orders,
            addend=addend,
            swamped=swamped,
            underflowed=underflowed,
        )
        return Tracked(value, bound + rounding + underflow, dtype, origin)

    def cast(self, dtype: DType) -> Tracked:
        """The value converted to `dtype`: one rounding where that dtype is coarser, else exact."""
        if dtype.unit_roundoff <= self.dtype.unit_roundoff:
            return Tracked(self.value, self.bound, dtype, Origin((self,), lambda change: (change,)), self.terms)
        addend = None if self.origin is None else self.origin.addend  # a sum rounded here for the first time
        stored = self._stored(
            self.value, self.bound, Origin((self,), lambda change: (change,)), dtype=dtype, addend=addend
        )
        return replace(stored, terms=self.terms)

    def _as_dot_product_reads_it(self, dtype: DType) -> Tracked:
        """This operand as a dot product computing in `dtype` reads it: where those treat subnormals as zero, an
        element below the smallest normal number may be read as 0, an error of up to its own magnitude."""
        if not dtype.flushes_in_dot_products:
            return self
        subnormal = self.magnitude < self.dtype.smallest_normal
        flushed = np.where(subnormal, self.magnitude, 0.0)
        origin = Origin((self,), lambda change: (change,), bias=flushed)
        return Tracked(self.value, np.where(subnormal, self.magnitude, self.bound), self.dtype, origin)

    @staticmethod
    def _product_underflow(dtype: DType, accumulation: DType) -> float:
        """What one product, or partial sum, of a dot product computing in `dtype` may lose to underflow in
        `accumulation`."""
        return accumulation.smallest_normal if dtype.flushes_in_dot_products else accumulation.underflow

    def __matmul__(self, other: Tracked) -> Tracked:
        return self.matmul(other)

    def _products(self, other: Tracked) -> tuple:
        """What every product bound needs: the value, the operands' errors carried through
        (``|a| @ e_b + e_a @ |b|``), ``|a| @ |b|`` as a dot product reads the operands, ``|a| @ |b|`` of the
        operands as they are where that is the same product (None where subnormals read as zero change it), and
        the operands as read. Operands of two dtypes are promoted (`dtypes.promoted`) before the product, which
        computes in that dtype."""
        value = self.value @ other.value
        dtype = promoted(self.dtype, other.dtype)
        left, right = self._as_dot_product_reads_it(dtype), other._as_dot_product_reads_it(dtype)
        propagated: np.ndarray | float = 0.0
        if left.bound.any():
            propagated = propagated + _nonnegative_matmul(left.bound, np.abs(right.value))
        if right.bound.any():
            propagated = propagated + _nonnegative_matmul(left.magnitude, right.bound)
        magnitudes = _nonnegative_matmul(left.magnitude, right.magnitude)
        as_they_are = magnitudes if left is self and right is other else None
        return value, propagated, magnitudes, as_they_are, (left, right)

    def _summed(self, other: Tracked, parts: tuple, accumulation: DType, initial: Tracked | None = None) -> Tracked:
        """The product with `other` of `_products`' `parts` (with `initial` accumulated as one more term), stored
        in the operands' promoted dtype."""
        value, propagated, magnitudes, _, (left, right) = parts
        dtype = promoted(self.dtype, other.dtype, *([] if initial is None else [initial.dtype]))
        inner = self.value.shape[-1]
        operands: tuple[Tracked, ...] = (left, right)
        addend = None
        if initial is not None:
            start = initial._as_dot_product_reads_it(dtype)
            addend = _smaller(initial.value, value, value.shape)
            inner, value = inner + 1, initial.value + value
            propagated, magnitudes = start.bound + propagated, start.magnitude + magnitudes
            operands += (start,)
        # Each of the `inner` products may also underflow in the accumulation dtype (absolute error).
        accumulated = gamma(inner, accumulation) * magnitudes
        underflow = inner * self._product_underflow(dtype, accumulation)
        bound = propagated + accumulated + underflow
        return Tracked._product(operands, value, bound, magnitudes, accumulation, dtype, addend)

    @staticmethod
    def _product(
        operands: tuple[Tracked, ...],
        value: np.ndarray,
        bound: np.ndarray,
        magnitudes: np.ndarray,
        accumulation: DType,
        dtype: DType,
        addend: np.ndarray | None = None,
    ) -> Tracked:
        """``a @ b`` (``+ c``, where a third operand starts the sum), the operands as a dot product computing in
        `dtype` reads them: its exact `value`, off by at most `bound` before it is stored in `dtype`; in the model, each
        of its products and partial sums (of `magnitudes`: ``|a| @ |b| (+ |c|)``) rounded in `accumulation`."""
        a, b = operands[0].value, operands[1].value
        start = operands[2].value.shape if len(operands) > 2 else None
        inner = a.shape[-1] + (start is not None)

        def pullback(change: np.ndarray) -> tuple[np.ndarray, ...]:
            return (*_matmul_pullback(a, b, change), _unbroadcast(change, start))

        # The model's sum: each of the inner partial sums, and each product, rounded independently.
        noise = math.sqrt(inner + 1) * accumulation.unit_roundoff * magnitudes
        lost = _underflows(inner, Tracked._product_underflow(dtype, accumulation), dtype.flushes_in_dot_products)
        moved = functools.partial(_matmul_pullback, a, b) if start is None else pullback
        single = _single_products_rounding(a, b, dtype) if inner == 1 else None
        origin = Origin(operands, moved, variance=np.square(noise + lost.noise), bias=lost.bias, constant=single)
        return operands[0]._stored(value, bound, origin, dtype.dot_product_underflow, dtype, addend)

    def matmul(self, other: Tracked, accumulation: DType = ACCUMULATION) -> Tracked:
        """The matrix product, its sums accumulated in `accumulation` (float32 unless said otherwise)."""
        return self._summed(other, self._products(other), accumulation)

    def matmul_onto(self, initial: Tracked, other: Tracked, accumulation: DType = ACCUMULATION) -> Tracked:
        """``initial + self @ other`` as one sum of n + 1 terms that starts from `initial`, as BLAS's gemm
        with beta = 1 (torch's ``baddbmm``) may evaluate it: `initial` is accumulated with the products."""
        return self._summed(other, self._products(other), accumulation, initial)

    def affine(self, other: Tracked, bias: Tracked, accumulation: DType = ACCUMULATION) -> Tracked:
        """``self @ other + bias``: the product, then the bias; or, as BLAS's ``addmm`` (torch's Linear and
        Conv1D) does, one sum of n + 1 terms that starts from the bias (`matmul_onto`). The bound covers both."""
        parts = self._products(other)
        return Tracked.covering(
            self._summed(other, parts, accumulation) + bias, self._summed(other, parts, accumulation, bias)
        )

    def matmul_of_stored_terms(self, other: Tracked, accumulation: DType) -> Tracked:
        """The product where each of the n terms is stored in the dtype before the sum, as a gather's
        gradient is (each row's product, then a scatter-add): one more rounding, and underflow, per term."""
        product = self.matmul(other, accumulation)
        underflow = self.value.shape[-1] * product.dtype.dot_product_underflow
        stored = product.dtype.unit_roundoff * (self.magnitude @ other.magnitude) + underflow
        noise = product.dtype.unit_roundoff * np.sqrt(np.square(self.magnitude) @ np.square(other.magnitude))
        dtype = product.dtype
        lost = _underflows(self.value.shape[-1], dtype.dot_product_underflow, dtype.flushes_in_dot_products)
        origin = Origin((product,), lambda change: (change,), variance=np.square(noise + lost.noise), bias=lost.bias)
        return Tracked(product.value, product.bound + stored, product.dtype, origin)

    def __add__(self, other: Tracked) -> Tracked:
        """The sum, in the promoted dtype (`cast` the result where it is stored more coarsely)."""
        return self._sum(other, 1.0)

    def __sub__(self, other: Tracked) -> Tracked:
        return self._sum(other, -1.0)

    def _sum(self, other: Tracked, sign: float) -> Tracked:
        left, right = self.value.shape, other.value.shape

        def pullback(change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _unbroadcast(change, left), sign * _unbroadcast(change, right)

        value = self.value + sign * other.value
        origin = Origin((self, other), pullback)
        addend = _smaller(self.value, sign * other.value, value.shape)
        dtype = promoted(self.dtype, other.dtype)
        return self._stored(value, self.bound + other.bound, origin, dtype=dtype, addend=addend)

    def plus(self, other: Tracked) -> Tracked:
        """``self + other`` stored in this value's dtype, where `other` may be finer (a float32 adapter's term on a
        half-precision base): added in the finer dtype and the sum cast once, as peft does, or `other` cast first
        and added in this dtype, as MLX does. The bound covers both."""
        if other.dtype == self.dtype:
            return self + other
        return Tracked.covering((self + other).cast(self.dtype), self + other.cast(self.dtype))

    def __mul__(self, other: Tracked) -> Tracked:
        """Elementwise (broadcasting) product."""
        a, b = self.value, other.value

        def pullback(change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _unbroadcast(change * b, a.shape), _unbroadcast(change * a, b.shape)

        propagated = np.abs(a) * other.bound + self.bound * other.magnitude
        dtype = promoted(self.dtype, other.dtype)
        single = _elementwise_products_rounding(self, other, dtype)
        origin = Origin((self, other), pullback, constant=single)
        return self._stored(a * b, propagated, origin, dtype=dtype)

    def __truediv__(self, other: Tracked) -> Tracked:
        """Elementwise (broadcasting) quotient; unbounded where the divisor's error reaches its size."""
        value = self.value / other.value
        a, b = self.value, other.value
        with np.errstate(divide="ignore", invalid="ignore"):
            slack = np.abs(other.value) - other.bound
            propagated = np.where(slack > 0, (self.bound + np.abs(value) * other.bound) / slack, np.inf)

        def pullback(change: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return _unbroadcast(change / b, a.shape), _unbroadcast(-change * value / b, b.shape)

        origin = Origin((self, other), pullback)
        return self._stored(value, propagated, origin, dtype=promoted(self.dtype, other.dtype))

    def row_norm(self, accumulation: DType = ACCUMULATION) -> Tracked:
        """The Euclidean norm over the last axis, its squares formed and summed in `accumulation`."""
        inner = self.value.shape[-1]
        value = np.linalg.norm(self.value, axis=-1)
        propagated = np.linalg.norm(self.bound, axis=-1)
        # The sum of squares is off by gamma(n + 1) relatively, and a square root halves that; each of the n
        # squares may also underflow, which moves the sum by n half-subnormals and the root by at most the
        # root of that (|sqrt(a) - sqrt(b)| <= sqrt(|a - b|)).
        magnitude = np.linalg.norm(self.magnitude, axis=-1)
        accumulated = (gamma(inner + 1, accumulation) / 2) * magnitude
        underflow = np.sqrt(inner * accumulation.underflow)
        a = self.value

        def pullback(change: np.ndarray) -> tuple[np.ndarray]:
            with np.errstate(divide="ignore", invalid="ignore"):
                return (np.where(value[..., None] > 0, change[..., None] * a / value[..., None], 0.0),)

        noise = (math.sqrt(inner + 1) * accumulation.unit_roundoff / 2) * magnitude + underflow
        origin = Origin((self,), pullback, variance=np.square(noise))
        return self._stored(value, propagated + accumulated + underflow, origin)

    def sqrt(self) -> Tracked:
        """Elementwise square root of a non-negative quantity: the exact interval (sqrt is monotone)."""
        value = np.sqrt(self.value)
        low, high = np.sqrt(np.maximum(self.value - self.bound, 0.0)), np.sqrt(self.value + self.bound)
        spread = np.maximum(high - value, value - low)

        def pullback(change: np.ndarray) -> tuple[np.ndarray]:
            with np.errstate(divide="ignore", invalid="ignore"):
                return (np.where(value > 0, change / (2 * value), 0.0),)

        # Where the value is 0 its root's error is not linear in the operand's: the whole interval may be one-sided.
        origin = Origin((self,), pullback, bias=np.where(value > 0, 0.0, spread))
        return self._stored(value, spread, origin)

    def shifted(self, constant: float) -> Tracked:
        """Add a Python float, which an implementation may first round to the dtype."""
        rounded = float(round_to(np.array([constant]), self.dtype)[0])
        origin = Origin((self,), lambda change: (change,), constant=np.full(self.value.shape, rounded - constant))
        return self._stored(self.value + constant, self.bound + self.dtype.unit_roundoff * abs(constant), origin)

    def scaled(self, factor: float) -> Tracked:
        """Multiply by a Python float, which an implementation may first round to the dtype (see
        `scaling_roundings`: a power of two scales exactly, but for underflow)."""
        roundings = scaling_roundings(factor, self.dtype)
        value, propagated = factor * self.value, abs(factor) * self.bound

        def pullback(change: np.ndarray) -> tuple[np.ndarray]:
            return (factor * change,)

        if roundings == 0:
            underflowing = _underflowing(np.abs(value) + propagated, self.dtype, self.dtype.underflow)
            underflowed = _underflowed(value, underflowing)
            origin = Origin((self,), pullback, variance=np.square(underflowing), underflowed=underflowed)
            return Tracked(value, propagated + self.dtype.underflow, self.dtype, origin)
        rounded = float(round_to(np.array([factor]), self.dtype)[0])
        constant = (rounded - factor) * self.value + _products_rounding(rounded, self.value, self.dtype)
        origin = Origin((self,), pullback, constant=constant)
        if roundings == 1:  # the result's own rounding only (not 0 * the magnitude: where that is inf, 0 * inf is NaN)
            return self._stored(value, propagated, origin)
        scalar = (roundings - 1) * self.dtype.unit_roundoff * abs(factor) * self.magnitude
        return self._stored(value, propagated + scalar, origin)

    def scaled_matmul(self, other: Tracked, factor: float) -> Tracked:
        """``factor * (self @ other)``, where an implementation may instead scale either operand first.

        Scaling an operand first rounds every scaled element (and the factor), which costs
        ``k u |factor| |a| @ |b|`` (k of `scaling_roundings`: 2, or 1 for a factor the dtype holds, or
        0 for a power of two) instead of a rounding of the (possibly cancelled) result, plus the
        underflow of each scaled element carried through the other operand.
        """
        parts = self._products(other)
        product = self._summed(other, parts, ACCUMULATION).scaled(factor)
        # The operand scaled first rounds in its own dtype: the coarser one's bound covers either.
        coarser = max(self.dtype, other.dtype, key=lambda dtype: dtype.unit_roundoff)
        roundings = scaling_roundings(factor, coarser)
        as_they_are = parts[3] if parts[3] is not None else self.magnitude @ other.magnitude
        prescaled = roundings * coarser.unit_roundoff * abs(factor) * as_they_are
        # ``1 @ |other| + |self| @ 1``: the column sums of |other| and the row sums of |self|, without the products.
        rows = self.magnitude.sum(axis=-1)
        rows = rows[..., None] if self.value.ndim > 1 else rows
        ones_products = np.broadcast_to(rows + other.magnitude.sum(axis=-2), product.value.shape)
        underflow = coarser.dot_product_underflow * ones_products
        bound = product.bound + prescaled + underflow
        # The model's other orders, built from this product's parts (no more products): each scales an operand first.
        value, _, magnitudes, _, (left, right) = parts
        dtype = product.dtype
        scaled_value, scaled_magnitudes = factor * value, abs(factor) * magnitudes
        scaled_self = self.scaled(factor)._as_dot_product_reads_it(dtype)
        scaled_other = other.scaled(factor)._as_dot_product_reads_it(dtype)
        self_first = Tracked._product((scaled_self, right), scaled_value, bound, scaled_magnitudes, ACCUMULATION, dtype)
        # `other` scaled first: the same sums of the same magnitudes, so the same roundings.
        pullback = functools.partial(_matmul_pullback, left.value, scaled_other.value)
        origin = replace(self_first.origin, parents=(left, scaled_other), pullback=pullback)
        other_first = Tracked(self_first.value, self_first.bound, dtype, origin)
        return Tracked(product.value, bound, dtype, Origin(orders=(product, self_first, other_first)))


VALUES = "values"
"""A `Comparison` of the values themselves, element by element, against the allowed error."""
WHOLE = "whole"
"""A `Comparison` of the values as a whole, their root-mean-square error against the allowed one
(`foundation.model_verdict`): a whole model's logits."""


@dataclass
class Comparison:
    """One quantity of one side (subject or reference) held against the oracle: its values, or one other
    property of what it produced (its dtype, that it raised...), as `kind` says."""

    quantity: str
    side: str
    margin: float = 0.0
    max_error: float = 0.0
    allowed_at_worst: float = 0.0
    worst_index: tuple[int, ...] = ()
    observed_at_worst: float = 0.0
    expected_at_worst: float = 0.0
    problem: str | None = None
    """Set when the values cannot be compared at all: an exception, a wrong shape; or the property is wrong."""
    kind: str = VALUES
    """What was judged: `VALUES` element by element, or another property (``dtype``, ``raises``, ``shape``...)."""
    detail: str | None = None
    """What the side produced of that property: its dtype's name, the type of what it raised."""
    non_finite: int = 0
    """Values that fail: how many elements are inf or NaN where the oracle's are finite."""

    @property
    def passed(self) -> bool:
        return self.problem is None and self.margin <= 1.0

    @property
    def failure(self) -> str | None:
        """What is wrong, in the words a known-divergence entry uses: None when it passed; ``beyond`` or
        ``non-finite`` for values; else the kind (``dtype``, ``raises``, ``shape``, ``absent``...)."""
        if self.passed:
            return None
        if self.kind in (VALUES, WHOLE):
            return "non-finite" if self.non_finite else "beyond"
        return self.kind

    @property
    def what(self) -> str:
        """The side and quantity, and the property where it is not the values: ``subject merged weight dtype``."""
        return f"{self.side} {self.quantity}" + ("" if self.kind in (VALUES, WHOLE, "shape") else f" {self.kind}")

    def describe(self) -> str:
        if self.problem is not None:
            return f"{self.side} {self.quantity}: {self.problem}"
        if self.kind == WHOLE:
            return f"{self.what}: {self.detail}"
        if self.kind != VALUES:
            return f"{self.what} {self.detail}" if self.detail else self.what
        index = ", ".join(map(str, self.worst_index))
        return (
            f"{self.side} {self.quantity}[{index}]={self.observed_at_worst:.7g}, but should be "
            f"{self.expected_at_worst:.7g} (error {self.max_error:.3g}, allowed {self.allowed_at_worst:.3g}, "
            f"margin {self.margin:.3g})"
        )


def allowed_error(expected: Tracked) -> np.ndarray:
    """The per-element error that rounding in `expected.dtype` can explain."""
    return expected.allowed


def compare(quantity: str, side: str, observed: np.ndarray, expected: Tracked) -> Comparison:
    """Judge `observed` against the oracle's `expected` value, element by element (whatever its dtype was:
    `compare_dtype` judges that; the values are held to the bound of the dtype they should have come in)."""
    comparison = Comparison(quantity, side)
    if observed.shape != expected.value.shape:
        comparison.problem = f"shape is {observed.shape}, but should be {expected.value.shape}"
        comparison.kind = "shape"
        return comparison
    if observed.size == 0:
        return comparison
    allowed = allowed_error(expected)
    # Four passes over the elements in the common case: |observed - expected| / allowed, in place, and its maximum.
    with np.errstate(divide="ignore", invalid="ignore"):  # inf - inf, x / 0, 0 / 0 are decided below
        ratio = np.asarray(np.subtract(observed, expected.value, dtype=np.float64))
        np.abs(ratio, out=ratio)
        np.divide(ratio, allowed, out=ratio)  # an error where none is allowed is infinitely beyond it
    worst = int(ratio.argmax())
    if ratio.flat[worst] != ratio.flat[worst]:  # argmax found a NaN first: a NaN result, 0 / 0 or inf / inf
        ratio[np.isnan(ratio)] = np.inf  # a non-finite result where any would do still fails
        # The very value expected (an infinity, or NaN where the expectation is itself NaN, as a re-quantization
        # of the subject's own merge may be) is no error.
        ratio[(observed == expected.value) | (np.isnan(observed) & np.isnan(expected.value))] = 0.0
        worst = int(ratio.argmax())
    got, want = float(observed.flat[worst]), float(expected.value.flat[worst])
    comparison.margin = float(ratio.flat[worst])
    error_at_worst = abs(got - want)
    comparison.max_error = float("inf") if math.isnan(error_at_worst) else error_at_worst
    comparison.allowed_at_worst = float(allowed.flat[worst])
    comparison.worst_index = tuple(int(i) for i in np.unravel_index(worst, ratio.shape))
    comparison.observed_at_worst = got
    comparison.expected_at_worst = want
    if comparison.margin > 1.0:
        comparison.non_finite = int(np.count_nonzero(~np.isfinite(observed) & np.isfinite(expected.value)))
    return comparison


def compare_dtype(quantity: str, side: str, observed_dtype: str, expected: Tracked) -> Comparison:
    """Judge the dtype `observed_dtype` a side gave `quantity` in: the oracle's, the case's."""
    comparison = Comparison(quantity, side, kind="dtype", detail=observed_dtype)
    if observed_dtype != expected.dtype.name:
        comparison.problem = f"dtype is {observed_dtype}, but should be {expected.dtype.name}"
    return comparison


def failed(problem: str, quantity: str, side: str, kind: str) -> Comparison:
    """A failing judgment of one property (`kind`) of what a side did, which `problem` describes."""
    return Comparison(quantity, side, margin=float("inf"), problem=problem, kind=kind)


def raised(error: BaseException, quantity: str, side: str) -> Comparison:
    """The side raised `error` where it should have produced `quantity`."""
    comparison = failed(f"raised {type(error).__name__}: {error}", quantity, side, "raises")
    comparison.detail = type(error).__name__
    return comparison


@dataclass
class Measurement:
    """Everything one check found for one case: the comparisons, and a diagnosis when it failed."""

    subject: str
    check: str
    case: dict
    comparisons: list[Comparison] = field(default_factory=list)
    hints: list[str] = field(default_factory=list)
    components: list = field(default_factory=list)
    """Where it passed: the subject's error along each term of each quantity (`foundation.systematic.Component`)."""
    costly_hints: Callable[[], list[str]] | None = None
    """Where it failed: a diagnosis that evaluates the check again, made only for a failure no known divergence
    explains (`diagnose_fully`)."""

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def diagnose_fully(self) -> None:
        """Add the costly hints, once."""
        if self.costly_hints is not None:
            self.hints += self.costly_hints()
            self.costly_hints = None

    @property
    def worst(self) -> Comparison:
        return max(self.comparisons, key=lambda c: (c.problem is not None, c.margin))

    @property
    def margin(self) -> float:
        return self.worst.margin if self.comparisons else 0.0
