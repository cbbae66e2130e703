"""LoRA on an ``nn.Linear`` base: the subject computes, and merges to, what peft and the formula do."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks, registry, training_checks
from conformance.asserting import record_and_assert
from foundation import profiles
from foundation.cases import gradients_fit, linear_cases

pytestmark = pytest.mark.family("linear")


@given(data=st.data())
def test_forward(subject, dtype, data, recorder):
    """In eval mode the output is ``x W^T + b + s (x A^T) B^T``, as peft computes it."""
    case = data.draw(linear_cases(dtype), label="case")
    record_and_assert(recorder, checks.forward(subject, case))


@given(data=st.data())
def test_merge(subject, dtype, data, recorder):
    """The merged layer has weight ``W + s B A``, the same bias, dtype and output as peft's merge."""
    case = data.draw(linear_cases(dtype), label="case")
    record_and_assert(recorder, checks.merge(subject, case))


@given(data=st.data())
def test_grad(subject, dtype, data, recorder):
    """Gradients for A, B and x are peft's and the formulas'; A and B train, the base does not."""
    case = data.draw(linear_cases(dtype).filter(gradients_fit), label="case")
    record_and_assert(recorder, training_checks.grad(subject, case))


@profiles.fewer_examples(3)
@given(data=st.data())
def test_grad_bias_all(subject, dtype, data, recorder):
    """With peft's ``bias="all"`` (MLX: the base's bias unfrozen) the bias trains too, ``db = sum_rows(T)``."""
    case = data.draw(linear_cases(dtype).filter(gradients_fit).filter(lambda case: case.has_bias), label="case")
    record_and_assert(recorder, training_checks.grad_bias_all(subject, case))


def _with_dropout(dtype):
    return linear_cases(dtype).filter(lambda case: case.dropout > 0)


@profiles.fewer_examples(3)
@given(data=st.data())
def test_dropout(subject, dtype, data, recorder):
    """In training mode, with one keep-mask given to both sides, dropout acts on the adapter's input only:
    ``x W^T + b + s (x' A^T) B^T`` with ``x' = x * mask / (1 - p)``."""
    record_and_assert(recorder, training_checks.dropout(subject, data.draw(_with_dropout(dtype), label="case")))


@pytest.mark.dtypes(*registry.ONLY_IN["dropout_scaling"])
@profiles.fewer_examples(5)
@given(data=st.data())
def test_dropout_scaling(subject, dtype, data, recorder):
    """The subject's own dropout is inverted: its training-mode outputs average to the eval output."""
    record_and_assert(recorder, training_checks.dropout_scaling(subject, data.draw(_with_dropout(dtype), label="case")))


def _steps_cases(dtype, check: str):
    """The cases the steps check can judge: the backward and the whole trajectory fit the dtype."""
    return linear_cases(dtype).filter(lambda case: gradients_fit(case) and registry.applies(check, case))


@pytest.mark.dtypes(*registry.ONLY_IN["steps_sgd"])
@profiles.fewer_examples(3)
@given(data=st.data())
def test_steps_sgd(subject, dtype, data, recorder):
    """A few SGD steps on ``1/2 sum((y - Y)^2)`` move A and B as torch's SGD moves peft's."""
    record_and_assert(recorder, training_checks.steps_sgd(subject, data.draw(_steps_cases(dtype, "steps_sgd"), label="case")))


@pytest.mark.dtypes(*registry.ONLY_IN["steps_adamw"])
@profiles.fewer_examples(3)
@given(data=st.data())
def test_steps_adamw(subject, dtype, data, recorder):
    """A few AdamW steps (bias-corrected, decoupled weight decay) move A and B as torch's AdamW moves peft's."""
    record_and_assert(recorder, training_checks.steps_adamw(subject, data.draw(_steps_cases(dtype, "steps_adamw"), label="case")))
