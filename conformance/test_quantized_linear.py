"""LoRA on a quantized Linear base, in every quantization mode and bit width the installed MLX offers.

peft is given the dequantized weight: that is what the quantized base computes with. Each mode is
its own parametrization (affine twice: bit widths whose values fit a 32-bit word whole, and 3, 5
and 6 bits, which straddle words), with a fifth of the profile's examples (the modes' bit widths and group
sizes are drawn).
"""

import mlx.nn as nn
import numpy as np
import pytest

from conformance import family_tests
from conformance.asserting import record_and_assert
from foundation.dtypes import CASE_DTYPES, round_to
from foundation.quantization import KINDS, first_of_kind, quantize_base, to_mlx
from foundation.verdict import Measurement, Tracked, compare
from subjects.bridge import mlx_array, to_numpy

globals().update(family_tests.module_tests("test_quantized_linear.py"))


@pytest.mark.family("linear")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", CASE_DTYPES, ids=str)
def test_quantized_matmul_accumulation(dtype, kind, recorder):
    """The base itself: MLX's quantized matrix product sums in float32, as a dense one does.

    A long all-positive row makes a sum in a half-precision accumulator visibly wrong, whatever the
    LoRA layer on top of it does; the LoRA checks above allow for such a base (see `oracle.linear_base`).
    """
    q = first_of_kind(kind)
    rng = np.random.default_rng(0)
    parts, weight = quantize_base(round_to(rng.uniform(0.5, 1, (4, 4096)), dtype), dtype, q)
    x = round_to(rng.uniform(0.5, 1, (2, 4096)), dtype)
    base = nn.QuantizedLinear(4096, 4, False, q.group_size, q.bits, q.mode)
    base.weight, base.scales, *biases = to_mlx(parts, dtype)
    base.biases = biases[0] if biases else None
    observed = to_numpy(base(mlx_array(x, dtype)))
    expected = Tracked.exact(x, dtype) @ Tracked.exact(weight, dtype).T
    measurement = Measurement(
        "None", "quantized_matmul_accumulation", {"dtype": dtype.name, "quantization": q.describe()}
    )
    measurement.comparisons.append(compare("quantized matmul output", "subject", observed, expected))
    record_and_assert(recorder, measurement)
