"""LoRA on a quantized mixture-of-experts base (``QuantizedSwitchLinear``), in every mode the installed
MLX offers: peft is given the dequantized experts' weights.

A tenth of the profile's examples per mode: the LoRA arithmetic is that of the dense switch base
(`test_switch_linear.py`); what is new here (dequantizing, re-quantizing, the merged dtype) shows on
any case.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks
from conformance.asserting import record_and_assert
from foundation import profiles
from foundation.quantization import KINDS
from foundation.switch_cases import switch_cases

pytestmark = [pytest.mark.parametrize("kind", KINDS), pytest.mark.family("switch_linear")]


@profiles.fewer_examples(10)
@given(data=st.data())
def test_forward(subject, dtype, kind, data, recorder):
    """Each routed output is LoRA's on the token's expert's dequantized weight."""
    record_and_assert(recorder, checks.switch_forward(subject, data.draw(switch_cases(dtype, kind), label="case")))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_merge(subject, dtype, kind, data, recorder):
    """``fuse(dequantize=True)`` gives every expert ``W_e + s B_e A_e`` in the base dtype, as peft's merge."""
    record_and_assert(recorder, checks.switch_merge(subject, data.draw(switch_cases(dtype, kind), label="case")))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_merged_forward(subject, dtype, kind, data, recorder):
    """The dequantized fused layer routes tokens to their experts' merged weights."""
    record_and_assert(recorder, checks.switch_merged_forward(subject, data.draw(switch_cases(dtype, kind), label="case")))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_requantize(subject, dtype, kind, data, recorder):
    """``fuse()`` re-quantizes exactly that merge, in the base's mode, bit width and group size."""
    record_and_assert(recorder, checks.requantize(subject, data.draw(switch_cases(dtype, kind), label="case")))
