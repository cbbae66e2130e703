"""Bases in transformers' ``Conv1D`` layout (GPT-2 style, weight (in, out)): peft with ``fan_in_fan_out``.

MLX has no such layout: the bridge gives the subject the transposed weight as an ``nn.Linear``, so
these checks hold peft's Conv1D handling and the bridge's transposes to the same oracle.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks
from conformance.asserting import record_and_assert
from foundation import profiles
from foundation.cases import linear_cases


def _conv1d_cases(dtype, use_dora):
    return linear_cases(dtype, use_dora=use_dora, fan_in_fan_out=True)


@pytest.mark.family("linear")
@pytest.mark.check("forward")
@profiles.fewer_examples(3)
@given(data=st.data())
def test_lora_forward(subject, dtype, data, recorder):
    """LoRA's output, against peft's LoRA on a Conv1D base."""
    record_and_assert(recorder, checks.forward(subject, data.draw(_conv1d_cases(dtype, False), label="case")))


@pytest.mark.family("linear")
@pytest.mark.check("merge")
@profiles.fewer_examples(3)
@given(data=st.data())
def test_lora_merge(subject, dtype, data, recorder):
    """The merged weight (transposed back from peft's (in, out)), bias, dtype and output."""
    record_and_assert(recorder, checks.merge(subject, data.draw(_conv1d_cases(dtype, False), label="case")))


@pytest.mark.family("dora_linear")
@pytest.mark.check("forward")
@profiles.fewer_examples(3)
@given(data=st.data())
def test_dora_forward(subject, dtype, data, recorder):
    """DoRA's output, against peft's DoRA on a Conv1D base."""
    record_and_assert(recorder, checks.forward(subject, data.draw(_conv1d_cases(dtype, True), label="case")))


@pytest.mark.family("dora_linear")
@pytest.mark.check("merge")
@profiles.fewer_examples(3)
@given(data=st.data())
def test_dora_merge(subject, dtype, data, recorder):
    """DoRA's merged weight, bias, dtype and output, against peft's merge on a Conv1D base."""
    record_and_assert(recorder, checks.merge(subject, data.draw(_conv1d_cases(dtype, True), label="case")))
