"""DoRA on an ``nn.Linear`` base: the magnitude, the detached weight norm and the merge agree with peft."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, training_checks
from conformance.asserting import record_and_assert
from foundation import profiles
from foundation.cases import gradients_fit, linear_cases

pytestmark = pytest.mark.family("dora_linear")


def _dora_cases(dtype):
    return linear_cases(dtype, use_dora=True)


@given(data=st.data())
def test_forward(subject, dtype, data, recorder):
    """In eval mode the output is ``m / ||W + s B A|| * (x W^T + s (x A^T) B^T) + b``, as peft computes it."""
    record_and_assert(recorder, checks.forward(subject, data.draw(_dora_cases(dtype), label="case")))


@given(data=st.data())
def test_merge(subject, dtype, data, recorder):
    """The merged weight is ``m / ||W + s B A|| * (W + s B A)``; bias, dtype and output as peft's merge."""
    record_and_assert(recorder, checks.merge(subject, data.draw(_dora_cases(dtype), label="case")))


@given(data=st.data())
def test_init(subject, dtype, data, recorder):
    """Created on a base, with B zero, the magnitude is the base weight's row norms ``||W||``."""
    record_and_assert(recorder, checks.init(subject, data.draw(_dora_cases(dtype), label="case")))


@given(data=st.data())
def test_init_with_adapter(subject, dtype, data, recorder):
    """Derived with a non-zero B in place, the magnitude is ``||W + s B A||``, as peft derives it."""
    record_and_assert(recorder, checks.init_with_adapter(subject, data.draw(_dora_cases(dtype), label="case")))


@given(data=st.data())
def test_grad(subject, dtype, data, recorder):
    """Gradients for A, B, m and x treat ``||W + s B A||`` as a constant, as peft (and the DoRA paper) do;
    A, B and m train, the base does not."""
    record_and_assert(recorder, training_checks.grad(subject, data.draw(_dora_cases(dtype).filter(gradients_fit), label="case")))


@profiles.fewer_examples(3)
@given(data=st.data())
def test_grad_bias_all(subject, dtype, data, recorder):
    """With peft's ``bias="all"`` the base's bias trains too."""
    cases = _dora_cases(dtype).filter(gradients_fit).filter(lambda case: case.has_bias)
    record_and_assert(recorder, training_checks.grad_bias_all(subject, data.draw(cases, label="case")))


@profiles.fewer_examples(3)
@given(data=st.data())
def test_dropout(subject, dtype, data, recorder):
    """In training mode, with one keep-mask given to both sides: peft's ``x W^T + b + (f - 1) x' W^T +
    f s (x' A^T) B^T`` with ``f = m / ||W + s B A||`` and ``x' = x * mask / (1 - p)``."""
    cases = _dora_cases(dtype).filter(lambda case: case.dropout > 0)
    record_and_assert(recorder, training_checks.dropout(subject, data.draw(cases, label="case")))
