"""DoRA on a quantized Linear base, in every quantization mode and bit width the installed MLX offers.

peft is given the dequantized weight: that is what the quantized base computes with. Each mode is
its own parametrization (affine twice: bit widths whose values fit a 32-bit word whole, and 3, 5
and 6 bits, which straddle words), with a tenth of the profile's examples (the bit widths and group
sizes are drawn): DoRA's arithmetic is that of `test_dora_linear.py`, and what is new here
(dequantizing, re-quantizing, sizing the adapter) shows on any case.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, training_checks
from conformance.asserting import record_and_assert
from foundation import profiles
from foundation.cases import gradients_fit, linear_cases
from foundation.quantization import KINDS

pytestmark = [pytest.mark.parametrize("kind", KINDS), pytest.mark.family("dora_linear")]


def _quantized_cases(dtype, kind):
    return linear_cases(dtype, use_dora=True, quantized=kind)


@profiles.fewer_examples(10)
@given(data=st.data())
def test_forward(subject, dtype, kind, data, recorder):
    """On a ``QuantizedLinear`` the output is DoRA's on the dequantized weight."""
    record_and_assert(recorder, checks.forward(subject, data.draw(_quantized_cases(dtype, kind), label="case")))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_merge(subject, dtype, kind, data, recorder):
    """``fuse(dequantize=True)`` gives DoRA's merge of the dequantized weight in the base dtype, as peft's merge does."""
    record_and_assert(recorder, checks.merge(subject, data.draw(_quantized_cases(dtype, kind), label="case")))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_requantize(subject, dtype, kind, data, recorder):
    """``fuse()`` re-quantizes exactly that merge, in the base's mode, bit width and group size."""
    record_and_assert(recorder, checks.requantize(subject, data.draw(_quantized_cases(dtype, kind), label="case")))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_init(subject, dtype, kind, data, recorder):
    """Created on a quantized base, the magnitude is the dequantized weight's row norms."""
    record_and_assert(recorder, checks.init(subject, data.draw(_quantized_cases(dtype, kind), label="case")))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_grad(subject, dtype, kind, data, recorder):
    """QDoRA: A, B, m and x get DoRA's gradients on the dequantized weight (norm detached)."""
    case = data.draw(_quantized_cases(dtype, kind).filter(gradients_fit), label="case")
    record_and_assert(recorder, training_checks.grad(subject, case))
