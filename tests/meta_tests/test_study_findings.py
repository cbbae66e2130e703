"""Cases the verdict studies (`studies/`) found failing a correct layer, kept so that they stay fixed.

Each was a gap in the error model or in what the suite draws, never a reason to widen a tolerance:
the test says which, and fails if the gap opens again.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from catalogue import CorrectDoRALinear, CorrectLoRALinear, CorrectLoRASwitchLinear
from conformance import replay
from conformance.families import DORA_LINEAR, EMBEDDING, LINEAR
from foundation.cases import fits_dtype, gradients_fit, make_embedding_case, make_linear_case
from foundation.dtypes import BFLOAT16
from foundation.quantization import Quantization
from foundation.rebuild import case_from_description
from foundation.verdict import compare
from reference import oracle
from subjects.known import resolve


def _case(**parameters) -> dict:
    defaults = {
        "use_rslora": False,
        "bias": False,
        "dropout": 0.0,
        "batch_shape": [],
        "use_dora": False,
        "quantization": None,
        "fan_in_fan_out": False,
        "cancel": None,
    }
    return {**defaults, **parameters}


PEFT_SCALES_DORA_LAST = _case(
    dtype="float16",
    in_features=8,
    out_features=130,
    r=11,
    alpha=107.0,
    use_rslora=True,
    scale=32.26171386982071,
    dropout=0.1,
    batch_shape=[1, 3],
    magnitudes=[2.0**-10, 2.0**-10, 2.0**-8, 2.0**-8],
    seed=29869691,
    use_dora=True,
)
"""peft computes DoRA's LoRA term as ``(f ((x' A^T) B^T)) s``: with a tiny x, A and B the product f times the
unscaled term underflows in float16, and s = 32 magnifies that (the reference failed `dropout` with margin 1.0x)."""

PRODUCTS_UNDERFLOW = _case(
    dtype="float32",
    in_features=1,
    out_features=1314,
    r=128,
    alpha=1.0,
    scale=2.0**-7,
    bias=True,
    batch_shape=[2, 2],
    magnitudes=[2.0**-61] * 4,
    seed=134427,
    cancel="input",
)
"""Every product of the backward pass's sums sinks below float32's subnormals, and the steps' learning rate (a tenth
of the adapter's norm over the gradient's) magnifies each product's underflow (steps_sgd failed, margin 1.07)."""

DORA_NORM_IN_THE_SUBNORMALS = _case(
    dtype="float16",
    in_features=1,
    out_features=102,
    r=16,
    alpha=0.01,
    use_rslora=True,
    scale=0.0025,
    dropout=0.5,
    magnitudes=[0.5, 2.0**-10, 64.0, 2.0**-10],
    seed=2757493363,
    use_dora=True,
)
"""The adapted weight's rows are single elements in float16's subnormals: the dtype does not determine DoRA's norm,
the oracle's bound on the factor m / ||W + s B A|| was infinite and the gradients' bound NaN (grad failed)."""


PEFT_DORA_BIAS = _case(
    dtype="bfloat16",
    in_features=153,
    out_features=179,
    r=63,
    alpha=1.1,
    use_rslora=True,
    scale=0.13858697343671667,
    bias=True,
    batch_shape=[2, 1, 1],
    magnitudes=[0.5, 64.0, 32.0, 2.0**-8],
    seed=2628,
    use_dora=True,
)
"""peft's DoRA bias enters twice, in the base layer's output and in ``(f - 1) (x W^T + b - b)``, so its gradient is
``T + T (f - 1) - T (f - 1)``, rounded: the reference used 0.74 of the allowed error here (the most of any
bfloat16 DoRA case), and 4.1 times it with a magnitude eight times the norm."""


PEFT_FOLDS_THE_EXPERT_UPDATE = _case(
    kind="switch",
    dtype="float32",
    in_features=3,
    out_features=319,
    r=44,
    alpha=10.0,
    use_rslora=True,
    scale=1.507556722888818,
    batch_shape=[3, 2],
    magnitudes=[64.0, 0.25, 2.0**-10, 2.0**-8],
    seed=533137760,
    num_experts=4,
    top_k=3,
    sorted_indices=False,
)
"""peft's ``target_parameters`` forms ``W_e + s B_e A_e`` with one ``baddbmm``, which accumulates W_e with the r
products: W_e's rounding grows with r, not once (the reference failed `forward`, margin 1.31; `grad` up to 1.44)."""


BFLOAT16_PRODUCTS_FLUSHED = _case(
    dtype="bfloat16",
    in_features=1024,
    out_features=1,
    r=80,
    alpha=1.0,
    use_rslora=True,
    scale=0.11180339887498948,
    batch_shape=[3],
    magnitudes=[2.0**-58, 2.0**-58, 2.0**-63, 2.0**47],
    seed=2038,
    cancel="terms",
)
"""Every product of peft's x A^T lies below 2^-126, and torch's CPU matmul of bfloat16 (oneDNN's AVX512_BF16 kernels)
flushes such products to zero: x A^T was off by up to 20 times its value, the output by 340 times its own (the
reference failed `forward`, margin 1.6; `grad` 18 in a case whose gradient lies in the subnormals)."""

PEFT_DORA_BASE_WITH_ITS_BIAS = _case(
    dtype="float32",
    in_features=1792,
    out_features=14,
    r=256,
    alpha=256.0,
    use_rslora=True,
    scale=16.0,
    bias=True,
    dropout=0.1,
    batch_shape=[2, 2],
    magnitudes=[2.0**-22, 2.0**42, 2.0**-12, 2.0**-46],
    seed=4224475060,
    use_dora=True,
)
"""peft's DoRA output is the base layer's (torch's addmm, which may fold the bias into its sum of n + 1 terms) plus
``(f - 1) (base - b) + f s lora``: with a bias 10^6 times x W^T, the base's rounding is the bias's, n times over
(the reference failed `forward`, margins 1.27 to 1.53, in 4 of 1,477 extreme float32 DoRA cases)."""


STEPS_OVERFLOW_IN_A_LATER_STEP = _case(
    dtype="float32",
    in_features=4,
    out_features=1053,
    r=128,
    alpha=1.0,
    use_rslora=True,
    scale=0.08838834764831843,
    dropout=0.5,
    magnitudes=[2.0**-32, 2.0, 2.0**52, 2.0**41],
    seed=496526,
)
"""After the first SGD step A is near 10^24, and the next backward pass's T B overflows float32 (the reference's A
after step 3 was inf), though the trajectory's gradients and adapters themselves stay in range."""


@pytest.mark.parametrize(
    ("subject", "check", "case"),
    [
        (CorrectDoRALinear, "dropout", PEFT_SCALES_DORA_LAST),
        (CorrectLoRALinear, "steps_sgd", PRODUCTS_UNDERFLOW),
        (CorrectLoRASwitchLinear, "forward", PEFT_FOLDS_THE_EXPERT_UPDATE),
        (CorrectLoRALinear, "forward", BFLOAT16_PRODUCTS_FLUSHED),
        (CorrectDoRALinear, "forward", PEFT_DORA_BASE_WITH_ITS_BIAS),
    ],
    ids=[
        "peft scales DoRA's term last",
        "each product underflows",
        "peft folds the expert update",
        "bfloat16 products flushed",
        "peft's DoRA base keeps its bias's rounding",
    ],
)
def test_a_correct_layer_passes_where_the_bound_had_a_gap(subject, check, case, capsys):
    assert replay.main([json.dumps({"subject": subject.name, "check": check, "case": case})]) == 0, (
        capsys.readouterr().out
    )


def test_dora_cases_whose_norm_the_dtype_does_not_determine_are_not_drawn():
    assert not fits_dtype(case_from_description(DORA_NORM_IN_THE_SUBNORMALS))


def test_peft_dora_bias_gradient_is_covered_however_far_the_magnitude_is_from_the_norm():
    case = case_from_description(PEFT_DORA_BIAS)
    trained_far = dataclasses.replace(case, magnitude=8 * case.magnitude)  # the suite draws m within 2x of the norm
    measurement = DORA_LINEAR.checks_on()["grad_bias_all"].run(CorrectDoRALinear, trained_far)
    assert measurement.passed, measurement.worst.describe()


def test_steps_checks_leave_out_trajectories_whose_later_passes_overflow():
    case = case_from_description(STEPS_OVERFLOW_IN_A_LATER_STEP)
    assert fits_dtype(case) and gradients_fit(case)
    assert not LINEAR.checks_on()["steps_sgd"].applies(case)


def test_dora_cases_whose_row_norms_square_beyond_the_accumulation_are_not_drawn():
    """Found by the extreme cases: rows of W + s B A near 10^23 square beyond float32, and torch's and MLX's norms
    (which sum the squares without rescaling) return inf: an output of 0 where 10^10 is right."""
    huge = _case(
        dtype="float32",
        in_features=1024,
        out_features=4,
        r=2,
        alpha=1.0,
        scale=0.5,
        magnitudes=[1.0, 2.0**66, 1.0, 1.0],
        seed=1,
        use_dora=True,
    )
    case = case_from_description(huge)
    assert not torch.isfinite(torch.linalg.norm(torch.tensor(case.weight, dtype=torch.float32), dim=1)).all()
    assert not fits_dtype(case)
    assert fits_dtype(case_from_description({**huge, "magnitudes": [1.0, 2.0**40, 1.0, 1.0]}))


def test_a_quantized_lookup_is_judged_as_the_gather_it_is_not_as_a_sum_in_the_dtype():
    """Detection on quantized bases, embedding, bfloat16: a lookup's one-hot product was charged the worst case of a
    sum of `vocabulary` terms in bfloat16, infinite from 256 terms (202 of 2,197 cases could not fail). A one-hot
    row sums one term, which no accumulation rounds."""
    case = make_embedding_case(
        512,
        64,
        Quantization("affine", 4, 64),
        dtype=BFLOAT16,
        r=4,
        alpha=8.0,
        use_rslora=False,
        dropout=0.0,
        batch_shape=(3,),
        magnitudes=(1.0, 1.0, 1.0, 1.0),
        seed=5,
        use_dora=False,
    )
    expected = oracle.embedding_forward(case)
    assert np.all(np.isfinite(expected.bound))
    subject = resolve("catalogue:CorrectLoRAEmbedding")
    assert EMBEDDING.checks_on("quantized")["forward"].run(subject, case).passed
    lora_term = oracle.lora_update(case.lookup).value
    assert not compare("output", "subject", expected.value + 0.5 * lora_term, expected).passed


@pytest.mark.parametrize("subject", ["catalogue:CorrectLoRALinear", "mlx_lm.LoRALinear"])
def test_a_quantized_base_in_bfloat16_is_judged_by_its_kernel_s_own_error_not_by_an_infinite_worst_case(subject):
    """Detection on quantized bases, bfloat16: MLX's CPU quantized product sums in bfloat16, and the worst case of a
    sum of 256 or more terms in bfloat16 is infinite (862 of 2,473 linear cases could not fail, whatever the error).
    The base's share of the bound is what MLX's quantized base is off by on the case, forward and backward."""
    four_bits = Quantization("affine", 4, 64)
    case = make_linear_case(
        BFLOAT16,
        512,
        8,
        r=4,
        alpha=8.0,
        use_rslora=False,
        dropout=0.0,
        batch_shape=(3,),
        has_bias=True,
        magnitudes=(1.0, 1.0, 1.0, 1.0),
        seed=1,
        quantization=four_bits,
    )
    expected = oracle.linear_forward(case)
    upstream = np.ones((3, 8))
    grad_x = oracle.linear_grads(case, upstream)["grad x"]
    assert np.all(np.isfinite(expected.bound)) and np.all(np.isfinite(grad_x.bound))
    checks = LINEAR.checks_on("quantized")
    assert checks["forward"].run(resolve(subject), case).passed
    assert checks["grad"].run(resolve(subject), case).passed
    lora_term = oracle.lora_update(case).value
    assert not compare("output", "subject", expected.value + 0.1 * lora_term, expected).passed
    assert not compare("grad x", "subject", 1.1 * grad_x.value, grad_x).passed


def test_dora_embeddings_whose_row_norms_the_dtype_does_not_determine_are_not_drawn_and_bounds_are_never_nan():
    """Found by the ci profile's draws: MLX's DoRA embedding (DoRA on the tied head, one norm per vocabulary row,
    `EmbeddingCase.per_row`) divides by norms of rows of one element here, which cancel in bfloat16. The peft
    layout's norms were checked when drawing, these were not; and the bound of ``as_linear`` was NaN (0 * inf in
    a scale's rounding), which failed the correct layer where the allowed error is unbounded."""
    case = make_embedding_case(
        26,
        1,
        dtype=BFLOAT16,
        r=3,
        alpha=15.0,
        use_rslora=False,
        dropout=0.0,
        batch_shape=(),
        seed=0,
        magnitudes=(1.0, 1.0, 1.0, 1.0),
        use_dora=True,
    )
    assert fits_dtype(case.lookup) and fits_dtype(case.head) and not fits_dtype(case.per_row)
    allowed = oracle.embedding_rows_as_linear(case).allowed
    assert not np.isnan(allowed).any() and np.isinf(allowed).any()
