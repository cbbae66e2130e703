"""LoRA on an ``nn.Embedding`` base: lookups, the tied output head and the merge agree with peft."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, registry, training_checks
from conformance.asserting import record_and_assert
from foundation import profiles
from foundation.cases import embedding_cases, gradients_fit

pytestmark = pytest.mark.family("embedding")


@given(data=st.data())
def test_forward(subject, dtype, data, recorder):
    """In eval mode a lookup is ``W[ids] + s A^T[ids] B^T``, as peft's LoRA Embedding computes it."""
    record_and_assert(recorder, checks.lookup(subject, data.draw(embedding_cases(dtype), label="case")))


@given(data=st.data())
def test_as_linear(subject, dtype, data, recorder):
    """``as_linear`` (a tied output head) is ``hidden @ (W + s A^T B^T)^T``: hidden against peft's merged table."""
    record_and_assert(recorder, checks.as_linear(subject, data.draw(embedding_cases(dtype), label="case")))


@given(data=st.data())
def test_merge(subject, dtype, data, recorder):
    """The merged table is ``W + s A^T B^T`` in the base dtype, and looks up what peft's merge does."""
    record_and_assert(recorder, checks.embedding_merge(subject, data.draw(embedding_cases(dtype), label="case")))


@profiles.fewer_examples(2)
@given(data=st.data())
def test_grad(subject, dtype, data, recorder):
    """Gradients for A and B of ``sum(y * T)`` are peft's and the formulas'; A and B train, the table does not."""
    cases = embedding_cases(dtype).filter(lambda case: gradients_fit(case.lookup))
    record_and_assert(recorder, training_checks.grad(subject, data.draw(cases, label="case")))


@profiles.fewer_examples(3)
@given(data=st.data())
def test_dropout(subject, dtype, data, recorder):
    """In training mode, with one keep-mask given to every dropout module: peft's LoRA Embedding applies
    no dropout (ids cannot be dropped), so the lookup is the eval one."""
    cases = embedding_cases(dtype).filter(lambda case: case.lookup.dropout > 0)
    record_and_assert(recorder, training_checks.dropout(subject, data.draw(cases, label="case")))


def _fitting(dtype, check: str):
    """The cases the steps check can judge: the backward and the whole trajectory fit the dtype."""
    return embedding_cases(dtype).filter(lambda case: gradients_fit(case.lookup) and registry.applies(check, case))


@pytest.mark.dtypes(*registry.ONLY_IN["steps_sgd"])
@profiles.fewer_examples(3)
@given(data=st.data())
def test_steps_sgd(subject, dtype, data, recorder):
    """A few SGD steps on ``1/2 sum((y - Y)^2)`` move A and B as torch's SGD moves peft's (the rows of A a
    batch does not look up stay where they are)."""
    record_and_assert(recorder, training_checks.steps_sgd(subject, data.draw(_fitting(dtype, "steps_sgd"), label="case")))


@pytest.mark.dtypes(*registry.ONLY_IN["steps_adamw"])
@profiles.fewer_examples(3)
@given(data=st.data())
def test_steps_adamw(subject, dtype, data, recorder):
    """A few AdamW steps move A and B as torch's AdamW moves peft's; rows not looked up still decay."""
    record_and_assert(recorder, training_checks.steps_adamw(subject, data.draw(_fitting(dtype, "steps_adamw"), label="case")))
