"""A family added the way docs/development.md ("Adding a family") says, for `tests/test_adding_a_family.py`: LoRA on a
Linear base without a bias, described in one record, with a correct and a wrong subject."""

from __future__ import annotations

from catalogue.layers import CorrectLoRALinear, PeftStyleConvention, RawAlpha
from conformance import checks
from conformance.families import BaseInfo, CheckInfo, Family
from foundation.cases import gradients_fit, linear_cases
from subjects.known import Subject

MODULE = "test_linear_without_bias.py"

LINEAR_WITHOUT_BIAS = Family(
    name="linear_without_bias",
    layout="linear",
    use_dora=False,
    bases=(
        BaseInfo(
            "float",
            MODULE,
            lambda dtype: linear_cases(dtype, with_bias=False),
            (
                CheckInfo("forward", checks.forward, "In eval mode the output is ``x W^T + s (x A^T) B^T``."),
                CheckInfo("merge", checks.merge, "The merged weight is ``W + s B A``.", examples=3),
            ),
        ),
    ),
    study_cases=lambda dtype: linear_cases(dtype, with_bias=False).filter(gradients_fit),
)

TEST_MODULE = f'''"""{LINEAR_WITHOUT_BIAS.name}: generated from its description."""

from conformance import family_tests

globals().update(family_tests.module_tests("{MODULE}"))
'''
"""The whole test module of the family."""

CORRECT = Subject(
    f"{__name__}:CORRECT",
    "mlx",
    LINEAR_WITHOUT_BIAS.name,
    (f"{CorrectLoRALinear.__module__}:{CorrectLoRALinear.__name__}",),
    PeftStyleConvention(),
)
WRONG = Subject(
    f"{__name__}:WRONG",
    "mlx",
    LINEAR_WITHOUT_BIAS.name,
    (f"{RawAlpha.__module__}:{RawAlpha.__name__}",),
    PeftStyleConvention(),
)
