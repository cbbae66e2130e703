"""Hypothesis strategies that draw cases: shapes, rank, alpha, scaling rule, dtype, and the weights.

Weights are drawn as float64 master values from a seeded generator, at magnitudes Hypothesis picks,
and rounded once to the case dtype, so the subject, the reference and the oracle all see exactly the
same numbers. B is never zero: a zero B hides every scaling bug.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import KW_ONLY, dataclass, field, replace

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from foundation import profiles, weights
from foundation.dtypes import ACCUMULATION, BY_NAME, FLOAT32, DType, round_to
from foundation.memo import built_once
from foundation.quantization import AVAILABLE, Parts, Quantization, quantize_base


def scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """peft's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / (math.sqrt(r) if use_rslora else r)


@dataclass(frozen=True)
class LinearParameters:
    """What determines a LoRA (or DoRA) layer on an ``nn.Linear`` base completely: `make_linear_case` makes
    its arrays from these, so its `describe()` is enough to rebuild it (see ``python -m conformance.replay``)."""

    dtype: DType
    in_features: int
    out_features: int
    r: int
    alpha: float
    use_rslora: bool
    dropout: float
    batch_shape: tuple[int, ...]
    has_bias: bool
    magnitudes: tuple[float, float, float, float]
    """Powers of two that scale x, W (and b), A and B."""
    seed: int
    use_dora: bool = False
    quantization: Quantization | None = None
    """The base is quantized in this mode: `weight` holds what it dequantizes to."""
    fan_in_fan_out: bool = False
    """peft's base is a transformers ``Conv1D``, which stores the weight as (in, out)."""
    cancel: str | None = None
    """Made to cancel (see `CANCELLATIONS`), or None: drawn independently."""
    adapter_dtype: DType | None = None
    """The dtype of A, B (and DoRA's m): float32 on a half-precision base, as mlx-lm creates adapters and peft
    upcasts them (``autocast_adapter_dtype``), or the base's `dtype` (None gives that)."""

    def __post_init__(self) -> None:
        if self.adapter_dtype is None:
            object.__setattr__(self, "adapter_dtype", self.dtype)

    @property
    def scale(self) -> float:
        return scaling(self.alpha, self.r, self.use_rslora)

    @property
    def mixed(self) -> bool:
        """Whether the adapter is held in another dtype than the base (float32 on a half-precision base)."""
        return self.adapter_dtype != self.dtype

    def describe(self) -> dict:
        """The parameters as results record them (``bias`` for `has_bias`, with the `scale` they give)."""
        described = {
            _DESCRIBED.get(f.name, f.name): getattr(self, f.name) for f in dataclasses.fields(LinearParameters)
        }
        described.update(
            dtype=self.dtype.name,
            adapter_dtype=self.adapter_dtype.name,
            batch_shape=list(self.batch_shape),
            magnitudes=list(self.magnitudes),
            quantization=self.quantization.describe() if self.quantization else None,
        )
        return {name: described[name] if name != "scale" else self.scale for name in DESCRIPTION_ORDER}

    @classmethod
    def from_description(cls, description: dict) -> LinearParameters:
        """The parameters a ``describe()`` gives (older descriptions lack the later parameters: their defaults)."""
        named = {
            f.name: description[_DESCRIBED.get(f.name, f.name)]
            for f in dataclasses.fields(LinearParameters)
            if _DESCRIBED.get(f.name, f.name) in description
        }
        named.update(
            dtype=BY_NAME[description["dtype"]],
            adapter_dtype=BY_NAME[description.get("adapter_dtype") or description["dtype"]],
            batch_shape=tuple(description["batch_shape"]),
            magnitudes=tuple(description["magnitudes"]),
            quantization=Quantization(**description["quantization"]) if description.get("quantization") else None,
        )
        return cls(**named)

    def parameters(self) -> dict:
        """The parameters alone, by name, as `LinearParameters` takes them (a case's, without its arrays)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LinearParameters)}


_DESCRIBED = {"has_bias": "bias"}
"""Parameters whose recorded name is another."""
DESCRIPTION_ORDER = (
    "dtype",
    "in_features",
    "out_features",
    "r",
    "alpha",
    "use_rslora",
    "scale",
    "bias",
    "dropout",
    "batch_shape",
    "magnitudes",
    "seed",
    "use_dora",
    "quantization",
    "fan_in_fan_out",
    "cancel",
    "adapter_dtype",
)
"""The order of a described linear case's keys (the results' rows keep it)."""


@dataclass(frozen=True, repr=False, eq=False)
class LinearCase(LinearParameters):
    """One drawn configuration of a LoRA layer on an ``nn.Linear`` base, in peft's layouts: its parameters and
    the arrays `make_linear_case` made from them.

    Cases compare by identity (their arrays have no one truth value of ``==``), so what is computed from
    one can be kept with it (`foundation.memo`).
    """

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    _: KW_ONLY
    weight: np.ndarray = field(repr=False)
    """(out, in), like ``torch.nn.Linear.weight``."""
    bias: np.ndarray | None = field(repr=False)
    lora_A: np.ndarray = field(repr=False)
    """(r, in), like peft's ``lora_A.weight``."""
    lora_B: np.ndarray = field(repr=False)
    """(out, r), like peft's ``lora_B.weight``."""
    x: np.ndarray = field(repr=False)
    """(*batch_shape, in)."""
    magnitude: np.ndarray | None = field(repr=False)
    """DoRA's learned magnitude m, (out,): the adapted weight's row norms, as if trained a little."""
    quantized_parts: Parts | None = field(repr=False, default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        read_only(self)

    def __repr__(self) -> str:
        parameters = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"LinearCase({parameters})"

    def _repr_pretty_(self, printer, cycle) -> None:  # how Hypothesis and IPython print it
        printer.text(repr(self))


def read_only(case: object) -> None:
    """Make a case's arrays (its fields', a quantized base's parts) read-only: the checks of every subject may meet
    one case (`foundation.memo.share_cases`), so none may change it for the next."""
    for value in vars(case).values():
        for array in value if isinstance(value, tuple) else (value,):
            if isinstance(array, np.ndarray):
                array.flags.writeable = False


def make_linear_case(*args, **parameters) -> LinearCase:
    """The case with these parameters (those of `LinearParameters`, or one `LinearParameters`); its weights
    come from `seed` and are rounded to `dtype`."""
    p = args[0] if len(args) == 1 and isinstance(args[0], LinearParameters) else LinearParameters(*args, **parameters)
    dtype, quantization, cancel = p.dtype, p.quantization, p.cancel
    if cancel not in (None, *CANCELLATIONS) or (cancel == "terms" and quantization is not None):
        raise ValueError(
            f"cancel={cancel!r} (quantization {quantization}): should be None or one of {CANCELLATIONS}, "
            "and 'terms' needs a float base"
        )
    rng = np.random.default_rng(p.seed)
    x_scale, w_scale, a_scale, b_scale = p.magnitudes
    weight = draw_array(rng, (p.out_features, p.in_features), w_scale / math.sqrt(p.in_features), dtype)
    parts = None
    if quantization is not None:
        parts, weight = quantize_base(weight, dtype, quantization)
    bias = draw_array(rng, (p.out_features,), w_scale, dtype) if p.has_bias else None
    lora_A = draw_array(rng, (p.r, p.in_features), a_scale / math.sqrt(p.in_features), p.adapter_dtype)
    lora_B = draw_array(rng, (p.out_features, p.r), b_scale / math.sqrt(p.r), p.adapter_dtype)
    x = draw_array(rng, (*p.batch_shape, p.in_features), x_scale, dtype)
    if cancel == "terms":
        weight = round_to(weight / 1024 - p.scale * lora_B @ lora_A, dtype)
    if cancel == "input":
        x = _cancelling_input(x, np.concatenate([weight, lora_A]), dtype)
    magnitude = None
    if p.use_dora:
        adapted = weight + p.scale * lora_B @ lora_A
        trained = np.exp2(rng.uniform(-1, 1, p.out_features))
        magnitude = round_to(np.linalg.norm(adapted, axis=1) * trained, p.adapter_dtype)
    fields = {**p.parameters(), "batch_shape": tuple(p.batch_shape), "magnitudes": tuple(p.magnitudes)}
    return LinearCase(
        **fields,
        quantized_parts=parts,
        weight=weight,
        bias=bias,
        lora_A=lora_A,
        lora_B=lora_B,
        x=x,
        magnitude=magnitude,
    )


CANCELLATIONS = ("input", "terms")
"""How a case may be made to cancel: ``input``, x nearly orthogonal to the rows of W and A, so that
``x W^T`` and ``x A^T`` are sums of large terms that cancel; ``terms``, W = ``W_drawn / 1024 - s B A``
rounded, so that the base and the LoRA term of the output (and of the merged weight) cancel."""


def _cancelling_input(x: np.ndarray, rows: np.ndarray, dtype: DType) -> np.ndarray:
    """x with its component in the span of `rows` removed (all of them that leave a direction free)."""
    inner = x.shape[-1]
    rows = rows[: max(inner - 1, 0)]
    if not len(rows) or not x.size:
        return x
    basis = np.linalg.qr(rows.T)[0]  # (in, k) orthonormal columns spanning the rows
    return round_to(x - (x @ basis) @ basis.T, dtype)


def upstream_gradient(case: LinearCase) -> np.ndarray:
    """The fixed random tensor T of the gradient checks' loss ``sum(y * T)``, shaped like the output."""
    rng = np.random.default_rng([case.seed, 2])
    return draw_array(rng, (*case.batch_shape, case.out_features), 1.0, case.dtype)


def dropout_mask(case: LinearCase, shape: tuple[int, ...]) -> np.ndarray:
    """The keep-mask (1 kept, 0 dropped) that the dropout check gives both sides' dropout for an input of
    `shape`: fixed by the case and the number of elements (peft sees an unbatched DoRA input as a batch
    of one), so both sides drop the same elements of the same input."""
    rng = np.random.default_rng([case.seed, 3])
    return (rng.random(int(np.prod(shape))) >= case.dropout).astype(np.float64).reshape(shape)


def gradients_fit(case: LinearCase, upstream: np.ndarray | None = None) -> bool:
    """Whether the backward pass's intermediates stay far from overflow in the case dtype, as `fits_dtype`
    asks of the forward pass's, for the output's gradient `upstream` (default: the gradient checks' T)."""
    x = np.abs(case.x.reshape(-1, case.in_features))
    t = np.abs((upstream_gradient(case) if upstream is None else upstream).reshape(-1, case.out_features))
    candidates: tuple[np.ndarray, ...] = ()
    if case.use_dora:  # T is scaled by DoRA's factor m / ||W + s B A||; m's gradient sums T times the output
        unbiased = x @ np.abs(case.weight).T + case.scale * (x @ np.abs(case.lora_A).T) @ np.abs(case.lora_B).T
        norm = np.linalg.norm(case.weight + case.scale * case.lora_B @ case.lora_A, axis=1)
        candidates = (t * unbiased, (t * unbiased).sum(axis=0) / norm)
        t = t * np.abs(case.magnitude) / norm
    back = t @ np.abs(case.lora_B)
    candidates += (
        t,
        t @ np.abs(case.weight),
        back,
        case.scale * back @ np.abs(case.lora_A),
        case.scale * back.T @ x,
        case.scale * t.T @ (x @ np.abs(case.lora_A).T),
    )
    return all(float(np.max(c, initial=0.0)) < case.dtype.largest / 64 for c in candidates)


# Strategies are built once per process: Hypothesis works out a new strategy's properties when it is
# first drawn from, which need not happen again for every case.


@functools.cache
def integers_between(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(low, high)


@functools.cache
def _sampled_from(values: tuple) -> st.SearchStrategy:
    return st.sampled_from(values)


@functools.cache
def _features(limit: int) -> st.SearchStrategy[int]:
    # Small sizes are where off-by-one layouts show; larger ones are where rounding grows.
    return st.one_of(st.integers(1, 8), st.integers(1, limit))


@functools.cache
def _alpha(r: int) -> st.SearchStrategy[float]:
    integral = st.integers(1, 128).map(float)
    fractional = st.floats(1e-2, 128.0, allow_nan=False, allow_infinity=False)
    return st.one_of(integral, fractional, multiples_of_the_rank(r))


def multiples_of_the_rank(r: int) -> st.SearchStrategy[float]:
    """alpha = r / 2, r, 2 r or 4 r, as real configurations set it (peft's default alpha = r, mlx-vlm's 2 r):
    a power-of-two scale, which the verdict allows no rounding for."""
    return st.sampled_from((0.5, 1.0, 2.0, 4.0)).map(lambda multiple: multiple * r)


_EXPONENTS = (0, 0, 0, 0, 1, 1, -1, 2, -2, 3, -3, -4) + (-10, -8, 5, 6) * 2
_MAGNITUDES = st.sampled_from(tuple(2.0**e for e in _EXPONENTS))
"""A power of two to scale a tensor by, so weights of very different sizes meet: an ordinary one (2^-4 to 2^3, most
often 1) three times in five, else an extreme one, where half-precision intermediates (a square, a norm) under- or
overflow; whatever still fits the dtype is a case a correct implementation must get right. One choice a draw,
weighted by repeating values, shrinking towards 1."""


BOOLEANS = st.booleans()
_BATCH_SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=4)


def draw_array(rng: np.random.Generator, shape: tuple[int, ...], scale: float, dtype: DType) -> np.ndarray:
    return round_to(rng.standard_normal(shape) * scale, dtype)


@functools.cache  # one strategy per set of arguments (see `integers_between`)
@st.composite
def linear_parameters(
    draw: st.DrawFn,
    dtype: DType,
    use_dora: bool = False,
    with_bias: bool = True,
    quantized: str | None = None,
    fan_in_fan_out: bool = False,
    float32_adapters: bool = False,
) -> LinearParameters:
    """The parameters of `linear_cases`' cases, without their arrays (an embedding's or a switch layer's shape
    is drawn with them); with `float32_adapters`, a half-precision base's adapter is float32 in some of the cases
    (a quarter to a third: Hypothesis favours the first choice)."""
    sizes = profiles.sizes()
    kinds = tuple(q for q in AVAILABLE if q.kind == quantized)
    quantization = draw(_sampled_from(kinds), label="quantization") if quantized else None
    if quantization is None:
        in_features = draw(_features(sizes.max_features), label="in_features")
    else:  # whole groups of the quantization
        groups = draw(integers_between(1, max(1, sizes.max_features // quantization.group_size)), label="groups")
        in_features = groups * quantization.group_size
    out_features = draw(_features(sizes.max_features), label="out_features")
    r = draw(integers_between(1, sizes.max_rank), label="r")
    alpha = draw(_alpha(r), label="alpha")
    use_rslora = draw(BOOLEANS, label="use_rslora")
    has_bias = draw(BOOLEANS, label="bias") if with_bias else False
    dropout = draw(_sampled_from((0.0, 0.1, 0.5)), label="dropout")
    batch_shape = draw(_BATCH_SHAPES, label="batch_shape")
    seed = draw(integers_between(0, 2**32 - 1), label="seed")
    magnitudes = tuple(draw(_MAGNITUDES, label=f"magnitude of {name}") for name in ("x", "W", "A", "B"))
    adapter_dtype = dtype
    if float32_adapters and dtype != FLOAT32:
        adapter_dtype = draw(_sampled_from((dtype, FLOAT32)), label="adapter_dtype")
    return LinearParameters(
        dtype=dtype,
        in_features=in_features,
        out_features=out_features,
        r=r,
        alpha=alpha,
        use_rslora=use_rslora,
        dropout=dropout,
        batch_shape=tuple(batch_shape),
        has_bias=has_bias,
        magnitudes=magnitudes,
        seed=seed,
        use_dora=use_dora,
        quantization=quantization,
        fan_in_fan_out=fan_in_fan_out,
        adapter_dtype=adapter_dtype,
    )


@functools.cache
def linear_cases(dtype: DType, **options: bool | str | None) -> st.SearchStrategy[LinearCase]:
    """LoRA (or, with `use_dora`, DoRA) cases on a Linear base; the `options` are `linear_parameters`': with
    `quantized` (a `Quantization.kind`) on a QuantizedLinear, with `fan_in_fan_out` on peft's side a transformers
    Conv1D, with `float32_adapters` float32 adapters on a half-precision base too (`LinearParameters.adapter_dtype`)."""
    parameters = linear_parameters(dtype, **options)
    return only_drawable(parameters.map(lambda p: built_once(p, lambda: drawable(make_linear_case(p)))))


def only_drawable(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """The cases `strategy` builds, but those it could not (None): Hypothesis draws another in their place (up to
    three times within one example), which costs less than an example given up."""
    return strategy.filter(lambda case: case is not None)


def drawable(case: LinearCase) -> LinearCase | None:
    """The case, or None where it cannot be drawn: B is zero (which hides every scaling bug) or an intermediate
    comes near overflow (`fits_dtype`)."""
    return case if case.lora_B.any() and fits_dtype(case) else None


def fits_dtype(case: LinearCase) -> bool:
    """Whether every intermediate stays far from overflow in the case dtype."""
    x, limit = np.abs(case.x), case.dtype.largest / 64
    base = x @ np.abs(case.weight).T
    down = x @ np.abs(case.lora_A).T
    unscaled = down @ np.abs(case.lora_B).T
    merged = np.abs(case.weight) + case.scale * np.abs(case.lora_B) @ np.abs(case.lora_A)
    candidates = (base, down, unscaled, case.scale * unscaled, merged)
    if not all(float(np.max(a, initial=0.0)) < limit for a in candidates):
        return False
    if case.use_dora:
        # DoRA's row norms sum the squares of W + s B A in the accumulation dtype, without rescaling:
        # squares beyond its range are inf in every implementation of the formula.
        if float(np.max(np.sum(merged**2, axis=1), initial=0.0)) >= ACCUMULATION.largest / 64:
            return False
        return weights.dora_norms_determined(case, merged)
    return True


@dataclass(frozen=True, repr=False, eq=False)
class EmbeddingCase:
    """A LoRA (or DoRA) layer on an ``nn.Embedding`` base, held as the linear maps it is.

    A lookup ``W[ids]`` is the linear map ``one_hot(ids) @ W``, so `lookup` is a `LinearCase` with
    in_features = vocabulary, out_features = dims, weight ``W^T`` (dims, vocabulary) and peft's
    ``lora_embedding_A`` (r, vocabulary) and ``lora_embedding_B`` (dims, r) as its A and B; its x is
    the one-hot ids. DoRA's magnitude is then per embedding dimension, as in peft. `hidden` is the
    input of ``as_linear`` (the tied output head): (*batch_shape, dims).
    """

    lookup: LinearCase
    ids: np.ndarray
    hidden: np.ndarray
    quantized_parts: Parts | None = field(repr=False, default=None)
    """A quantized table's parts: the (vocabulary, dims) table quantized along dims, as
    ``nn.QuantizedEmbedding`` holds it (`lookup.quantization` names the mode)."""

    def __post_init__(self) -> None:
        read_only(self)

    @property
    def dtype(self) -> DType:
        return self.lookup.dtype

    @property
    def quantization(self) -> Quantization | None:
        return self.lookup.quantization

    @property
    def adapter_dtype(self) -> DType:
        return self.lookup.adapter_dtype

    @property
    def mixed(self) -> bool:
        return self.lookup.mixed

    @property
    def weight(self) -> np.ndarray:
        """The embedding table, (vocabulary, dims)."""
        return self.lookup.weight.T

    @functools.cached_property
    def head(self) -> LinearCase:
        """``as_linear`` as a LoRA linear case: ``hidden @ (W + s A^T B^T)^T``, dims -> vocabulary."""
        lookup = self.lookup
        return replace(
            lookup,
            in_features=lookup.out_features,
            out_features=lookup.in_features,
            weight=self.weight,
            lora_A=lookup.lora_B.T,
            lora_B=lookup.lora_A.T,
            x=self.hidden,
            use_dora=False,
            magnitude=None,
            quantized_parts=self.quantized_parts,
        )

    @functools.cached_property
    def per_row(self) -> LinearCase:
        """DoRA as MLX's ``DoRAEmbedding`` defines it: `head` with one magnitude per vocabulary row, (vocabulary,).

        MLX normalises each token's vector (each row of the adapted table) and rescales it by that row's
        magnitude; as a linear map, that is DoRA on the head (dims -> vocabulary), whose output rows are
        the vocabulary's. The magnitude is drawn as a linear case's is, from the case's seed: the adapted
        rows' norms, as if trained a little.
        """
        head = self.head
        adapted = head.weight + head.scale * head.lora_B @ head.lora_A
        trained = np.exp2(np.random.default_rng([head.seed, 2]).uniform(-1, 1, head.out_features))
        return replace(head, use_dora=True, magnitude=round_to(np.linalg.norm(adapted, axis=1) * trained, head.dtype))

    def __repr__(self) -> str:
        parameters = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"EmbeddingCase({parameters})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))

    def describe(self) -> dict:
        described = self.lookup.describe()
        described["num_embeddings"] = described.pop("in_features")
        described["dims"] = described.pop("out_features")
        del described["bias"], described["fan_in_fan_out"]
        return {"kind": "embedding", **described}


def make_embedding_case(
    num_embeddings: int, dims: int, quantization: Quantization | None = None, **parameters
) -> EmbeddingCase:
    """The case with these parameters (those of `make_linear_case` but the base's shape and bias); with
    `quantization`, the table is an ``nn.QuantizedEmbedding``'s, quantized along dims."""
    lookup = make_linear_case(in_features=num_embeddings, out_features=dims, has_bias=False, **parameters)
    rng = np.random.default_rng([lookup.seed, 1])
    ids = rng.integers(0, num_embeddings, lookup.batch_shape)
    one_hot = np.eye(num_embeddings)[ids]
    hidden = draw_array(rng, (*lookup.batch_shape, dims), lookup.magnitudes[0], lookup.dtype)
    parts = None
    if quantization is not None:
        parts, table = quantize_base(lookup.weight.T, lookup.dtype, quantization)
        lookup = replace(lookup, weight=table.T, quantization=quantization)
    return EmbeddingCase(lookup=replace(lookup, x=one_hot), ids=ids, hidden=hidden, quantized_parts=parts)


@functools.cache
def embedding_cases(
    dtype: DType, use_dora: bool = False, quantized: str | None = None, float32_adapters: bool = False
) -> st.SearchStrategy:
    """LoRA (or DoRA) cases on an Embedding base in `dtype`, or with `quantized` (a `Quantization.kind`) on a
    QuantizedEmbedding; with `float32_adapters`, float32 adapters on a half-precision table too."""
    shapes = linear_parameters(
        dtype, use_dora=use_dora, with_bias=False, quantized=quantized, float32_adapters=float32_adapters
    )
    return only_drawable(shapes.map(lambda shape: built_once(("embedding", shape), lambda: _embedding_case(shape))))


def _embedding_case(shape: LinearParameters) -> EmbeddingCase | None:
    """The embedding case of a drawn shape, or None where it cannot be drawn."""
    parameters = {k: getattr(shape, k) for k in SHARED_PARAMETERS}
    # A quantized table is quantized along dims: the shape drawn for a quantized linear's input is dims.
    quantized = shape.quantization is not None
    vocabulary, dims = (shape.out_features, shape.in_features) if quantized else (shape.in_features, shape.out_features)
    case = make_embedding_case(vocabulary, dims, quantization=shape.quantization, **parameters)
    # DoRA on the tied head (MLX's DoRAEmbedding, `EmbeddingCase.per_row`) divides by its rows' norms too.
    head_fits = fits_dtype(case.per_row) if shape.use_dora else fits_dtype(case.head)
    return case if drawable(case.lookup) and head_fits else None


SHARED_PARAMETERS = (
    "dtype",
    "r",
    "alpha",
    "use_rslora",
    "dropout",
    "batch_shape",
    "magnitudes",
    "seed",
    "use_dora",
    "adapter_dtype",
)
"""What an embedding case shares with a linear one, but its shape (and a quantized table's mode)."""
