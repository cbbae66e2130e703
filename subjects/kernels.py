"""What MLX's own kernels compute, where the oracle needs it, and what they take on this device.

A quantized base in half precision may accumulate its product in the case dtype; the oracle narrows its
bound for that product to what MLX's kernel is off by on the case's own input (see
`reference.oracle.linear_base`), so it asks this module what the kernel gives.
"""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np

from foundation.cases import LinearCase
from foundation.dtypes import DType
from subjects import bridge


@functools.cache
def gather_mm_runs_in(dtype: DType) -> bool:
    """Whether MLX's ``gather_mm`` (a mixture of experts' product) takes `dtype` on this device: on the CPU it takes
    float32 only ("[GatherMM::eval] Currently only supports float32"), on Metal every float dtype."""
    values = mx.ones((1, 1, 2), dtype=getattr(mx, dtype.name))
    try:
        mx.eval(mx.gather_mm(values, mx.ones((2, 2, 2), dtype=values.dtype), rhs_indices=mx.array([0])))
    except (RuntimeError, ValueError):
        return False
    return True


def quantized_base_output(case: LinearCase) -> np.ndarray:
    """``x W^T + b`` as MLX's quantized base layer computes it on the case's x."""
    return bridge.to_numpy(bridge.base_linear(case)(bridge.input_of(case)))


def quantized_base_input_gradient(case: LinearCase, upstream: np.ndarray) -> np.ndarray:
    """``T W`` as MLX's backward of the quantized base computes it for the output's gradient `upstream`."""
    base, x = bridge.base_linear(case), bridge.mlx_array(case.x, case.dtype)
    _, (observed,) = mx.vjp(base, [x], [bridge.mlx_array(upstream, case.dtype)])
    return bridge.to_numpy(observed)
