"""Float32 adapters on half-precision and quantized bases: every family draws them, the cases rebuild with them,
optimizer steps train them in half precision, and a precision loss is named on whichever side shows it."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from conformance import checks, diagnosis, training_checks
from conformance.families import FAMILIES, LINEAR
from foundation.cases import make_embedding_case, make_linear_case
from foundation.dtypes import BFLOAT16, FLOAT16, FLOAT32
from foundation.rebuild import case_from_description
from foundation.switch_cases import make_switch_case, switch_upstream_gradient
from foundation.verdict import Measurement, compare
from reference import oracle, peft_layers

SHAPE = dict(r=3, alpha=6.0, use_rslora=False, dropout=0.0, magnitudes=(1.0, 1.0, 1.0, 1.0), seed=11)


def _linear_view(case):
    """The linear case that holds the arrays: an embedding's lookup, a switch layer's first expert."""
    return getattr(case, "lookup", None) or getattr(case, "first", None) or case


def _base_cases(family: str, base: str):
    info = FAMILIES[family].on(base)
    return info.cases(BFLOAT16, "affine") if base == "quantized" else info.cases(BFLOAT16)


LAYER_FAMILIES = [f for f in FAMILIES.values() if f.layout != "model"]


@pytest.mark.parametrize(
    "family, base", [(f.name, b.base) for f in LAYER_FAMILIES for b in f.bases], ids=lambda value: str(value)
)
def test_every_layer_family_draws_float32_and_half_precision_adapters_on_a_half_precision_base(family, base):
    seen = set()

    @settings(max_examples=60, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=_base_cases(family, base))
    def draw(case):
        seen.add(case.adapter_dtype.name)

    draw()
    assert FAMILIES[family].float32_adapters
    assert seen == {"bfloat16", "float32"}


@settings(max_examples=10, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=FAMILIES["model"].on("float").cases(BFLOAT16))
def test_a_whole_model_s_adapters_are_float32_on_any_base_as_mlx_lm_creates_them_and_peft_keeps_them(case):
    assert all(a.dtype == b.dtype == np.float32 for a, b in case.adapters.values())


@pytest.mark.parametrize(
    "make",
    [
        lambda: make_embedding_case(
            9, 5, dtype=FLOAT16, batch_shape=(4,), use_dora=True, adapter_dtype=FLOAT32, **SHAPE
        ),
        lambda: make_switch_case(
            3,
            2,
            False,
            in_features=4,
            out_features=5,
            has_bias=True,
            batch_shape=(2,),
            adapter_dtype=FLOAT32,
            dtype=BFLOAT16,
            **{k: v for k, v in SHAPE.items() if k != "seed"},
            seed=SHAPE["seed"],
        ),
    ],
    ids=["embedding", "switch"],
)
def test_a_described_case_rebuilds_with_its_float32_adapter(make):
    case = make()
    rebuilt = case_from_description(case.describe())
    view, again = _linear_view(case), _linear_view(rebuilt)
    assert view.mixed and again.adapter_dtype == FLOAT32
    assert np.array_equal(view.lora_A, again.lora_A) and np.array_equal(view.lora_B, again.lora_B)


def test_a_description_without_an_adapter_dtype_rebuilds_in_the_base_dtype():
    described = make_embedding_case(9, 5, dtype=FLOAT16, batch_shape=(4,), **SHAPE).describe()
    del described["adapter_dtype"]  # recorded before adapters were drawn in float32
    assert case_from_description(described).lookup.adapter_dtype == FLOAT16


@pytest.mark.parametrize("base", ["float", "quantized"])
def test_optimizer_steps_run_in_half_precision_only_with_a_float32_adapter(base):
    steps = LINEAR.checks_on(base)["steps_adamw"]
    assert steps.runs_in("bfloat16") and steps.runs_in("float16") and steps.runs_in("float32")
    linear = dict(in_features=64, out_features=6, batch_shape=(3,), has_bias=True, **SHAPE)
    if base == "quantized":
        from foundation.quantization import AVAILABLE

        linear["quantization"] = next(q for q in AVAILABLE if q.kind == "affine")
    half = make_linear_case(dtype=BFLOAT16, **linear)
    trained = make_linear_case(dtype=BFLOAT16, adapter_dtype=FLOAT32, **linear)
    assert not steps.applies(half)
    assert steps.applies(trained) == training_checks.steps_fit(trained, "adamw")


def test_peft_target_parameters_computes_a_float32_adapters_update_in_the_experts_dtype():
    """peft's ParamWrapper casts the factors to the experts' dtype before its baddbmm (get_delta_factors): with float32
    adapters on float16 experts its gradients are those of the adapter rounded to float16. The suite names that on
    the reference's side (`conformance/known_divergences.txt`)."""
    parameters = {**SHAPE, "magnitudes": (1.0, 1.0, 1.0, 2.0**-3), "r": 19, "alpha": 1.0, "seed": 1}
    case = make_switch_case(
        2,
        2,
        False,
        **{k: v for k, v in parameters.items() if k != "seed"},
        seed=parameters["seed"],
        dtype=FLOAT16,
        in_features=1,
        out_features=1,
        has_bias=False,
        batch_shape=(1,),
        adapter_dtype=FLOAT32,
    )
    upstream = switch_upstream_gradient(case)
    got, _ = peft_layers.switch_grads(case, upstream)
    observed = {name: checks.from_torch(values) for name, values in got.items()}
    rounded = oracle.switch_grads(diagnosis.adapter_in_base_dtype(case), upstream)
    exact = oracle.switch_grads(case, upstream)
    measurement = Measurement("peft", "grad", case.describe())
    measurement.comparisons += [compare(name, "reference", observed[name][0], exact[name]) for name in exact]
    assert not measurement.passed, "peft now keeps a float32 adapter's update in float32: update the known divergence"
    assert all(compare(n, "reference", observed[n][0], rounded[n]).passed for n in ("grad A", "grad B"))
    hints = diagnosis.precision_hints(
        case, measurement, observed, lambda c: oracle.switch_grads(c, upstream), "reference"
    )
    assert hints and hints[0].startswith("peft's ") and "computed in float16" in hints[0]


def test_no_precision_hint_without_a_float32_adapter():
    case = make_linear_case(dtype=BFLOAT16, in_features=4, out_features=3, batch_shape=(2,), has_bias=False, **SHAPE)
    measurement = Measurement("s", "forward", case.describe())
    measurement.comparisons.append(compare("output", "subject", np.zeros((2, 3)), oracle.linear_forward(case)))
    assert diagnosis.precision_hints(case, measurement, {"output": (np.zeros((2, 3)), None)}, lambda c: {}) == []


def test_half_precision_steps_fail_an_update_computed_in_half_precision(run_suite):
    """The steps of float32 adapters on a float16 base see an update computed in float16 (SGD follows the gradient's
    size; the grad check, which `catalogue.WRONG_VARIANTS` holds to 99% of seeds, catches it more reliably still)."""
    run = run_suite(
        "--subject", "catalogue:UpdateInHalfPrecision", "--dtype", "float16", "-k", "steps_sgd", module="test_linear.py"
    )
    assert run.ret == 1, run.output
    assert run.status("steps_sgd", "float16") == {"fail"}
