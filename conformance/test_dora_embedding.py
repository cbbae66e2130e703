"""DoRA on an ``nn.Embedding`` base, as peft defines it: one magnitude per embedding dimension."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks
from conformance.asserting import record_and_assert
from foundation.cases import embedding_cases

pytestmark = pytest.mark.family("dora_embedding")


def _dora_cases(dtype):
    return embedding_cases(dtype, use_dora=True)


@given(data=st.data())
def test_forward(subject, dtype, data, recorder):
    """A lookup is ``m / ||W + s A^T B^T||_columns * (W + s A^T B^T)[ids]``, as peft computes it."""
    record_and_assert(recorder, checks.lookup(subject, data.draw(_dora_cases(dtype), label="case")))


@given(data=st.data())
def test_as_linear(subject, dtype, data, recorder):
    """``as_linear`` is ``hidden @ merged table^T``."""
    record_and_assert(recorder, checks.as_linear(subject, data.draw(_dora_cases(dtype), label="case")))


@given(data=st.data())
def test_merge(subject, dtype, data, recorder):
    """The merged table is ``m / ||W + s A^T B^T||_columns * (W + s A^T B^T)`` in the base dtype."""
    record_and_assert(recorder, checks.embedding_merge(subject, data.draw(_dora_cases(dtype), label="case")))


@given(data=st.data())
def test_init(subject, dtype, data, recorder):
    """Created on a base, the magnitude is the table's norm per embedding dimension."""
    record_and_assert(recorder, checks.init(subject, data.draw(_dora_cases(dtype), label="case")))


@given(data=st.data())
def test_init_with_adapter(subject, dtype, data, recorder):
    """Derived with a non-zero B in place, the magnitude is the adapted table's norm per dimension."""
    record_and_assert(recorder, checks.init_with_adapter(subject, data.draw(_dora_cases(dtype), label="case")))
