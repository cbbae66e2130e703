"""LoRA on a mixture-of-experts base (``SwitchLinear``): each token's k experts, routed sorted or not.

peft adapts expert weights through ``target_parameters``; where it refuses a case (dropout > 0) the
reference is one peft ``Linear`` per expert (see `reference.peft_layers.switch`). Half the profile's
examples: each expert's arithmetic is a Linear layer's (`test_linear.py`); routing bugs show in any
case with two experts or more.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, training_checks
from conformance.asserting import record_and_assert
from foundation import profiles
from foundation.switch_cases import switch_cases, switch_gradients_fit

pytestmark = pytest.mark.family("switch_linear")


@profiles.fewer_examples(2)
@given(data=st.data())
def test_forward(subject, dtype, data, recorder):
    """Each routed output is ``x W_e^T + b_e + s (x A_e^T) B_e^T`` for the token's expert e."""
    record_and_assert(recorder, checks.switch_forward(subject, data.draw(switch_cases(dtype), label="case")))


@profiles.fewer_examples(2)
@given(data=st.data())
def test_merge(subject, dtype, data, recorder):
    """``fuse()`` gives every expert ``W_e + s B_e A_e`` and its bias, in the base dtype, as peft's merge."""
    record_and_assert(recorder, checks.switch_merge(subject, data.draw(switch_cases(dtype), label="case")))


@profiles.fewer_examples(2)
@given(data=st.data())
def test_merged_forward(subject, dtype, data, recorder):
    """The fused layer routes tokens to their experts' merged weights."""
    record_and_assert(recorder, checks.switch_merged_forward(subject, data.draw(switch_cases(dtype), label="case")))


@profiles.fewer_examples(2)
@given(data=st.data())
def test_grad(subject, dtype, data, recorder):
    """Expert e's A and B get the gradients of the tokens routed to it, x the sum over its experts; the
    adapters train, the experts' weights do not."""
    case = data.draw(switch_cases(dtype).filter(switch_gradients_fit), label="case")
    record_and_assert(recorder, training_checks.switch_grad(subject, case))
