"""A failure's diagnosis names a wrong LoRA scale whatever the check sees it through: the forward output, the
gradients, dropout in training, optimizer steps, and a quantized base in half precision, whose output is no exact
multiple of peft's LoRA term."""

from __future__ import annotations

import pytest

from conformance import checks, training_checks
from foundation.cases import make_linear_case
from foundation.dtypes import BFLOAT16, FLOAT32
from foundation.quantization import AVAILABLE
from subjects.known import resolve

RAW_ALPHA = "(= r: the raw alpha is used where alpha / r belongs)"
LINEAR = dict(in_features=64, out_features=6, r=4, alpha=3.0, use_rslora=False, batch_shape=(3,), has_bias=True, seed=5)
SCALES = (1.0, 1.0, 1.0, 1.0)


def _case(dtype=FLOAT32, dropout=0.0, quantized=False):
    quantization = next(q for q in AVAILABLE if q.kind == "affine") if quantized else None
    return make_linear_case(dtype=dtype, dropout=dropout, magnitudes=SCALES, quantization=quantization, **LINEAR)


@pytest.mark.parametrize(
    "check, case",
    [
        (training_checks.grad, _case()),
        (training_checks.grad_bias_all, _case()),
        (training_checks.dropout, _case(dropout=0.25)),
        (training_checks.steps_sgd, _case()),
        (checks.forward, _case(BFLOAT16, quantized=True)),
    ],
    ids=["grad", "grad_bias_all", "dropout", "steps_sgd", "quantized_forward_bfloat16"],
)
def test_a_raw_alpha_is_named_by_every_check_with_a_lora_term(check, case):
    measurement = check(resolve("catalogue:RawAlpha"), case)
    assert not measurement.passed
    measurement.diagnose_fully()
    assert any(RAW_ALPHA in hint for hint in measurement.hints), measurement.hints


def test_a_correct_layer_gets_no_scale_diagnosis_and_a_wrong_one_without_a_recognised_factor_none():
    correct = training_checks.grad(resolve("catalogue:CorrectLoRALinear"), _case())
    assert correct.passed and correct.costly_hints is None and correct.hints == []
    measurement = training_checks.grad(resolve("catalogue:GradientLeaksIntoBase"), _case())
    measurement.diagnose_fully()
    assert not any("LoRA scale" in hint for hint in measurement.hints)


def test_the_costly_diagnosis_is_made_only_for_a_failure_no_known_divergence_explains(run_suite, tmp_path):
    known = tmp_path / "known.txt"
    entry = "test_linear.py::test_grad[catalogue:RawAlpha-float32] | grad *: beyond margin 1..1e12  # the raw alpha"
    known.write_text(entry + "\n")
    selection = ("--subject", "catalogue:RawAlpha", "--dtype", "float32", "-k", "test_grad and not bias_all")
    explained = run_suite(*selection, "--known-divergences", str(known), module="test_linear.py")
    assert explained.ret == 0 and not any(r["hints"] for r in explained.results["rows"])
    failing = run_suite(*selection, module="test_linear.py")
    rows = [r for r in failing.results["rows"] if r["verdict"] == "fail"]
    assert rows and all(any("LoRA scale" in hint for hint in r["hints"]) for r in rows if r["final"])
