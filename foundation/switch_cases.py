"""Cases for LoRA on a mixture-of-experts base (MLX's ``SwitchLinear``): one linear case per expert.

A switch layer holds ``E`` experts' weights, (E, out, in), and routes each token to the ``k`` experts
its indices name. A `SwitchCase` is therefore ``E`` `LinearCase`s that share the input ``x`` and the
case parameters but not their weights, plus the routing: indices (*batch, k), ``k`` distinct experts
per token, as a top-k router picks them. Whether the subject is called with the rows sorted by expert
(``sorted_indices=True``, as ``SwitchGLU`` does for long inputs) is part of the case.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
from hypothesis import strategies as st

from foundation.cases import (
    BOOLEANS,
    EmbeddingCase,
    LinearCase,
    draw_array,
    drawable,
    gradients_fit,
    integers_between,
    linear_parameters,
    make_linear_case,
    only_drawable,
    read_only,
)
from foundation.dtypes import DType
from foundation.memo import built_once
from foundation.quantization import Quantization


@dataclass(frozen=True, repr=False, eq=False)
class SwitchCase:
    """LoRA on every expert of a switch layer, and how tokens are routed to them."""

    experts: tuple[LinearCase, ...]
    indices: np.ndarray
    """(*batch_shape, top_k): the experts each token is routed to."""
    sorted_indices: bool

    def __post_init__(self) -> None:
        read_only(self)

    @property
    def first(self) -> LinearCase:
        """The case parameters (every expert has the same), and the shared input."""
        return self.experts[0]

    @property
    def dtype(self) -> DType:
        return self.first.dtype

    @property
    def quantization(self) -> Quantization | None:
        return self.first.quantization

    @property
    def adapter_dtype(self) -> DType:
        return self.first.adapter_dtype

    @property
    def mixed(self) -> bool:
        return self.first.mixed

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    @property
    def top_k(self) -> int:
        return self.indices.shape[-1]

    @property
    def x(self) -> np.ndarray:
        return self.first.x

    def stacked(self, name: str) -> np.ndarray:
        """One array of every expert, stacked on a leading expert axis: ``stacked("weight")`` is (E, out, in)."""
        return np.stack([getattr(expert, name) for expert in self.experts])

    def __repr__(self) -> str:
        parameters = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"SwitchCase({parameters})"

    def _repr_pretty_(self, printer, cycle) -> None:  # how Hypothesis and IPython print it
        printer.text(repr(self))

    def describe(self) -> dict:
        return {
            "kind": "switch",
            **self.first.describe(),
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "sorted_indices": self.sorted_indices,
        }


Case = LinearCase | EmbeddingCase | SwitchCase
"""Any case the suite draws: a layer on a Linear, an Embedding or a mixture-of-experts base."""


def make_switch_case(num_experts: int, top_k: int, sorted_indices: bool, seed: int, **parameters) -> SwitchCase:
    """The case with these parameters (those of `make_linear_case`, which each expert is made with)."""
    # Expert 0 is the linear case of `seed` itself; the others and the routing get streams of their own.
    streams = np.random.SeedSequence(seed).spawn(num_experts)
    seeds = [seed, *(int(stream.generate_state(1)[0]) for stream in streams[1:])]
    experts = [make_linear_case(seed=expert_seed, **parameters) for expert_seed in seeds]
    x = experts[0].x
    rng = np.random.default_rng(streams[0])
    batch_shape = experts[0].batch_shape
    # k distinct experts per token: the first k of a random order of all of them.
    indices = np.argsort(rng.random((*batch_shape, num_experts)), axis=-1)[..., :top_k].astype(np.uint32)
    return SwitchCase(
        experts=tuple(replace(expert, x=x) for expert in experts),
        indices=indices,
        sorted_indices=sorted_indices,
    )


def switch_upstream_gradient(case: SwitchCase) -> np.ndarray:
    """The fixed random T of the gradient check's loss ``sum(y * T)``, shaped like the output (*batch, k, out)."""
    rng = np.random.default_rng([case.first.seed, 2])
    return draw_array(rng, (*case.indices.shape, case.first.out_features), 1.0, case.dtype)


def switch_gradients_fit(case: SwitchCase) -> bool:
    """Whether every expert's backward intermediates stay far from overflow (T at most 1 in size, as the
    linear check's)."""
    return all(gradients_fit(expert) for expert in case.experts)


@functools.cache
def switch_cases(
    dtype: DType, quantized: str | None = None, float32_adapters: bool = False
) -> st.SearchStrategy[SwitchCase]:
    """LoRA cases on a SwitchLinear base, 1 to 8 experts; with `quantized` (a `Quantization.kind`), on a
    QuantizedSwitchLinear; with `float32_adapters`, float32 adapters on half-precision experts too."""
    return only_drawable(_switch_cases_or_none(dtype, quantized, float32_adapters))


@st.composite
def _switch_cases_or_none(
    draw: st.DrawFn, dtype: DType, quantized: str | None, float32_adapters: bool
) -> SwitchCase | None:
    shape = draw(linear_parameters(dtype, quantized=quantized, float32_adapters=float32_adapters), label="expert shape")
    num_experts = draw(integers_between(1, 8), label="num_experts")
    top_k = draw(integers_between(1, min(4, num_experts)), label="top_k")
    sorted_indices = draw(BOOLEANS, label="sorted_indices")
    parameters = dict(
        dtype=dtype,
        in_features=shape.in_features,
        out_features=shape.out_features,
        r=shape.r,
        alpha=shape.alpha,
        use_rslora=shape.use_rslora,
        dropout=shape.dropout,
        batch_shape=shape.batch_shape or (1,),
        has_bias=shape.has_bias,
        magnitudes=shape.magnitudes,
        quantization=shape.quantization,
        adapter_dtype=shape.adapter_dtype,
    )

    def build() -> SwitchCase | None:
        case = make_switch_case(num_experts, top_k, sorted_indices, shape.seed, **parameters)
        return case if all(drawable(expert) for expert in case.experts) else None

    return built_once(("switch", shape, num_experts, top_k, sorted_indices), build)
