"""Cases at the edges, which the suite's own strategies rarely reach: what a sound verdict must survive.

- inner dimensions in the thousands (1,024 to 4,096; the other side kept small so a case stays cheap);
- ranks up to 256;
- alpha from 1e-3 to 1e3, log-uniformly, or a power-of-two multiple of r (a power-of-two scale);
- weights near the edges of the dtype's range: each of x, W, A and B scaled by a power of two whose
  exponent reaches half the dtype's largest exponent either way, so products approach overflow (the
  cases that would overflow are left out, as the suite leaves them out) or sink into the subnormals;
- cancelling sums (`foundation.cases.CANCELLATIONS`): an input nearly orthogonal to W's and A's rows,
  or a W that nearly cancels the LoRA term;
- a float32 adapter on a half-precision base, for the families that draw one (`Family.float32_adapters`).

The cases are ordinary `LinearCase`s, `EmbeddingCase`s and `SwitchCase`s: their ``describe()``
replays them with ``python -m conformance.replay``.
"""

from __future__ import annotations

import math

from hypothesis import assume
from hypothesis import strategies as st

from conformance.families import FAMILIES
from foundation.cases import (
    BOOLEANS,
    CANCELLATIONS,
    SHARED_PARAMETERS,
    LinearCase,
    fits_dtype,
    gradients_fit,
    make_embedding_case,
    make_linear_case,
    multiples_of_the_rank,
)
from foundation.dtypes import FLOAT32, DType
from foundation.switch_cases import make_switch_case, switch_gradients_fit

LONG = st.integers(1024, 4096)
SHORT = st.one_of(st.integers(1, 8), st.integers(1, 64))
RANKS = st.one_of(st.integers(1, 256), st.sampled_from((128, 256)))
ALPHAS = st.floats(-3.0, 3.0).map(lambda exponent: float(10.0**exponent))
BATCH_SHAPES = st.sampled_from(((), (1,), (3,), (2, 2)))
SEEDS = st.integers(0, 2**32 - 1)


def magnitudes(dtype: DType) -> st.SearchStrategy[float]:
    """Powers of two up to half the dtype's largest exponent either way (float16: 2^±7, others 2^±63)."""
    half_range = int(math.log2(dtype.largest)) // 2
    return st.integers(-half_range, half_range).map(lambda exponent: 2.0**exponent)


@st.composite
def _linear_parameters(draw: st.DrawFn, dtype: DType, cancel: bool = True, float32_adapters: bool = False) -> dict:
    adapter_dtype = dtype
    if float32_adapters and dtype != FLOAT32:
        adapter_dtype = draw(st.sampled_from((dtype, FLOAT32)), label="adapter_dtype")
    long_input = draw(BOOLEANS, label="inner dimension is the input")
    in_features, out_features = (draw(LONG), draw(SHORT)) if long_input else (draw(SHORT), draw(LONG))
    return dict(
        dtype=dtype,
        in_features=in_features,
        out_features=out_features,
        r=(r := draw(RANKS, label="r")),
        alpha=draw(st.one_of(ALPHAS, multiples_of_the_rank(r)), label="alpha"),
        use_rslora=draw(BOOLEANS, label="use_rslora"),
        dropout=draw(st.sampled_from((0.0, 0.1, 0.5)), label="dropout"),
        batch_shape=draw(BATCH_SHAPES, label="batch_shape"),
        has_bias=draw(BOOLEANS, label="bias"),
        magnitudes=tuple(draw(magnitudes(dtype), label=f"magnitude of {name}") for name in ("x", "W", "A", "B")),
        seed=draw(SEEDS, label="seed"),
        cancel=draw(st.sampled_from((None, *CANCELLATIONS)), label="cancel") if cancel else None,
        adapter_dtype=adapter_dtype,
    )


def _usable(case: LinearCase) -> bool:
    return bool(case.lora_B.any()) and fits_dtype(case) and gradients_fit(case)


@st.composite
def linear_cases(draw: st.DrawFn, dtype: DType, use_dora: bool = False, float32_adapters: bool = False) -> LinearCase:
    case = make_linear_case(use_dora=use_dora, **draw(_linear_parameters(dtype, float32_adapters=float32_adapters)))
    assume(_usable(case))
    return case


@st.composite
def embedding_cases(draw: st.DrawFn, dtype: DType, use_dora: bool = False, float32_adapters: bool = False):
    parameters = draw(_linear_parameters(dtype, cancel=False, float32_adapters=float32_adapters))
    shared = {k: parameters[k] for k in SHARED_PARAMETERS if k in parameters}
    case = make_embedding_case(parameters["in_features"], parameters["out_features"], use_dora=use_dora, **shared)
    assume(case.lookup.lora_B.any() and fits_dtype(case.lookup) and fits_dtype(case.head))
    assume(use_dora or gradients_fit(case.lookup))
    return case


@st.composite
def switch_cases(draw: st.DrawFn, dtype: DType, float32_adapters: bool = False):
    parameters = draw(_linear_parameters(dtype, float32_adapters=float32_adapters))
    num_experts = draw(st.integers(1, 8), label="num_experts")
    top_k = draw(st.integers(1, min(4, num_experts)), label="top_k")
    seed = parameters.pop("seed")
    parameters["batch_shape"] = parameters["batch_shape"] or (1,)
    case = make_switch_case(num_experts, top_k, draw(BOOLEANS, label="sorted_indices"), seed, **parameters)
    assume(all(expert.lora_B.any() and fits_dtype(expert) for expert in case.experts))
    assume(switch_gradients_fit(case))
    return case


def cases_for(family: str, dtype: DType) -> st.SearchStrategy:
    """The extreme cases of a family of `conformance.families.FAMILIES`, by its layout."""
    described = FAMILIES[family]
    float32_adapters = described.float32_adapters
    if described.layout == "switch":
        return switch_cases(dtype, float32_adapters=float32_adapters)
    if described.layout == "embedding":
        return embedding_cases(dtype, use_dora=described.use_dora, float32_adapters=float32_adapters)
    return linear_cases(dtype, use_dora=described.use_dora, float32_adapters=float32_adapters)
