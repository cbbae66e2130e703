"""The verdict itself: its rounding model holds on this machine, and it neither cries wolf nor waves bugs through."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from catalogue import CORRECT
from conformance import divergences, replay
from conformance.families import FAMILIES, LINEAR
from foundation import profiles
from foundation.cases import LinearCase, gradients_fit, linear_cases
from foundation.dtypes import ACCUMULATION, BFLOAT16, CASE_DTYPES, FLOAT16, FLOAT32, DType, round_to
from foundation.rebuild import case_from_description
from foundation.verdict import (
    CALIBRATION,
    Tracked,
    allowed_error,
    compare,
    compare_dtype,
    gamma,
    scaling_roundings,
)
from studies import sampling
from subjects.bridge import mlx_array, to_numpy

DTYPES = pytest.mark.parametrize("dtype", CASE_DTYPES, ids=str)


@DTYPES
def test_matmul_accumulates_at_least_in_float32(dtype):
    """The model's premise: a long all-positive sum of half-precision products keeps float32 accuracy."""
    rng = np.random.default_rng(0)
    a, b = round_to(rng.uniform(0, 1, (4, 4096)), dtype), round_to(rng.uniform(0, 1, (4096, 3)), dtype)
    expected = Tracked.exact(a, dtype) @ Tracked.exact(b, dtype)
    by_mlx = to_numpy(mlx_array(a, dtype) @ mlx_array(b, dtype))
    by_torch = (torch.from_numpy(a).to(dtype.torch) @ torch.from_numpy(b).to(dtype.torch)).double().numpy()
    for observed in (by_mlx, by_torch):
        assert np.all(np.abs(observed - expected.value) <= expected.bound)
    if dtype is not ACCUMULATION:
        # Accumulating in the dtype itself would be off by far more than one final rounding.
        assert gamma(4096) < dtype.unit_roundoff


def test_a_sum_may_be_rounded_once_but_not_be_two_units_in_the_last_place_off():
    total = Tracked.exact(np.array([1.0]), FLOAT16) + Tracked.exact(np.array([2.0**-12]), FLOAT16)
    assert compare("y", "subject", round_to(total.value, FLOAT16), total).passed
    two_ulps_off = compare("y", "subject", np.array([1.0 + 2 * 2.0**-10]), total)
    assert not two_ulps_off.passed and two_ulps_off.margin > 1


@pytest.mark.parametrize(
    "multiply",
    [
        lambda a, b: to_numpy(mlx_array(a, FLOAT32) @ mlx_array(b, FLOAT32)),
        lambda a, b: (torch.from_numpy(a) @ torch.from_numpy(b)).double().numpy(),
    ],
    ids=["mlx", "torch"],
)
def test_each_product_of_a_sum_may_underflow(multiply):
    """Found by the extreme cases: 1024 products of 2**-150 each round to zero, so their float32 sum is 0, not
    1024 * 2**-150 (a subnormal that one final rounding would keep). The bound carries one underflow per product."""
    a, b = np.full((1, 1024), 2.0**-75), np.full((1024, 1), 2.0**-75)
    expected = Tracked.exact(a, FLOAT32) @ Tracked.exact(b, FLOAT32)
    observed = multiply(a.astype(np.float32), b.astype(np.float32))
    assert observed.item() == 0 and expected.value.item() == 1024 * 2.0**-150
    assert compare("sum", "subject", observed, expected).passed


@pytest.mark.parametrize("subnormal", ["products", "operands"])
def test_bfloat16_dot_products_may_flush_subnormals_and_float32_ones_may_not(subnormal):
    """Found by the extreme cases: torch's CPU matmul of bfloat16 (oneDNN's AVX512_BF16 kernels, for most shapes;
    Arm's BFDOT does the same) reads subnormal operands as zero and flushes subnormal products, so peft's x A^T
    was off by 20 times its value where every product was below 2^-126. The bound allows that in bfloat16 only."""
    left, right = (2.0**-65, 2.0**-65) if subnormal == "products" else (2.0**-130, 2.0**3)
    a, b = np.full((3, 64), left), np.full((64, 80), right)
    for dtype, flush_allowed in ((BFLOAT16, True), (FLOAT32, False)):
        expected = Tracked.exact(a, dtype) @ Tracked.exact(b, dtype)
        by_torch = (torch.from_numpy(a).to(dtype.torch) @ torch.from_numpy(b).to(dtype.torch)).double().numpy()
        by_mlx = to_numpy(mlx_array(a, dtype) @ mlx_array(b, dtype))
        for observed in (by_torch, by_mlx):
            assert compare("product", "subject", observed, expected).passed
        assert compare("product", "subject", np.zeros_like(expected.value), expected).passed == flush_allowed


def test_a_norm_may_lose_every_square_to_underflow():
    """Rows of 2^-80 square to 2^-160, below float32's subnormals: torch's and MLX's norms are 0, not 2^-75. The
    bound carries each square's underflow (and so leaves such DoRA cases undrawn: the dtype does not determine them)."""
    rows = np.full((2, 1024), 2.0**-80)
    expected = Tracked.exact(rows, FLOAT32).row_norm()
    by_torch = torch.linalg.norm(torch.from_numpy(rows).float(), dim=1).double().numpy()
    by_mlx = to_numpy(mx.linalg.norm(mlx_array(rows, FLOAT32), axis=1))
    for observed in (by_torch, by_mlx):
        assert compare("norm", "subject", observed, expected).passed
    assert np.all(2 * expected.bound >= expected.value)


def test_a_scale_the_dtype_holds_costs_fewer_roundings_and_a_power_of_two_none():
    assert [scaling_roundings(f, BFLOAT16) for f in (2.0, 0.25, 20.0, 3.0, 7 / 3, 1 / 0.9)] == [0, 0, 1, 1, 2, 2]
    assert scaling_roundings(20.0 + 2.0**-10, FLOAT32) == 1 and scaling_roundings(20.0 + 2.0**-10, BFLOAT16) == 2


@DTYPES
@pytest.mark.parametrize("scale", [2.0, 20.0, 7 / 3], ids=["power of two", "held exactly", "rounded"])
def test_a_scaled_lora_term_of_mlx_and_torch_stays_within_its_bound_in_either_order(dtype, scale):
    """The LoRA term s ((x A^T) B^T), scaled last or with s folded into either operand first, by MLX and torch."""
    rng = np.random.default_rng(2)
    x, a, b = (round_to(rng.standard_normal(shape), dtype) for shape in ((6, 96), (96, 16), (16, 40)))
    down = Tracked.exact(x, dtype) @ Tracked.exact(a, dtype)
    expected = down.scaled_matmul(Tracked.exact(b, dtype), scale)
    mx_down = mlx_array(x, dtype) @ mlx_array(a, dtype)
    t_down = torch.from_numpy(x).to(dtype.torch) @ torch.from_numpy(a).to(dtype.torch)
    t_b = torch.from_numpy(b).to(dtype.torch)
    orders = {
        "mlx, scaled last": scale * (mx_down @ mlx_array(b, dtype)),
        "mlx, scaled B": mx_down @ (scale * mlx_array(b, dtype)),
        "torch, scaled last": (t_down @ t_b) * scale,
        "torch, scaled input": (t_down * scale) @ t_b,
    }
    for name, observed in orders.items():
        values = observed.double().numpy() if isinstance(observed, torch.Tensor) else to_numpy(observed)
        assert compare("lora term", name, values, expected).passed, name


HALF_DTYPES = pytest.mark.parametrize("dtype", [FLOAT16, BFLOAT16], ids=str)


def test_a_cast_rounds_once_to_a_coarser_dtype_and_keeps_the_value_in_a_finer_one():
    value = Tracked.exact(np.array([1.0 + 2.0**-20]), FLOAT32)
    assert value.cast(FLOAT16).dtype is FLOAT16 and value.cast(FLOAT16).bound[0] > 0
    assert compare("y", "subject", round_to(value.value, FLOAT16), value.cast(FLOAT16)).passed
    widened = Tracked.exact(np.array([1.5]), BFLOAT16).cast(FLOAT32)
    assert widened.dtype is FLOAT32 and widened.bound[0] == 0


def test_orders_stored_in_different_dtypes_are_not_one_formula():
    with pytest.raises(ValueError, match="different dtypes"):
        Tracked.covering(Tracked.exact(np.ones(2), FLOAT32), Tracked.exact(np.ones(2), BFLOAT16))


@HALF_DTYPES
def test_a_float32_adapter_s_term_on_a_half_precision_output_stays_within_its_bound_in_mlx_s_and_peft_s_order(dtype):
    """MLX casts ``s (x A^T) B^T`` to the output's dtype before the addition; peft adds in float32 and casts the
    sum once. Both are the formula's `Tracked.plus` in the base's dtype; x's product with a float32 A computes in
    float32 (`dtypes.promoted`)."""
    rng = np.random.default_rng(3)
    x, w = round_to(rng.standard_normal((6, 96)), dtype), round_to(rng.standard_normal((40, 96)) / 10, dtype)
    a, b = round_to(rng.standard_normal((96, 16)) / 10, FLOAT32), round_to(rng.standard_normal((16, 40)), FLOAT32)
    base = Tracked.exact(x, dtype) @ Tracked.exact(w, dtype).T
    update = (Tracked.exact(x, dtype) @ Tracked.exact(a, FLOAT32)).scaled_matmul(Tracked.exact(b, FLOAT32), 7 / 3)
    assert update.dtype is FLOAT32
    expected = base.plus(update)
    assert expected.dtype is dtype
    mx_x = mlx_array(x, dtype)
    mx_update = (7 / 3) * ((mx_x @ mlx_array(a, FLOAT32)) @ mlx_array(b, FLOAT32))
    by_mlx = mx_x @ mlx_array(w, dtype).T + mx_update.astype(mx_x.dtype)
    t_x = torch.from_numpy(x).to(dtype.torch)
    t_update = ((t_x.float() @ torch.from_numpy(a).float()) @ torch.from_numpy(b).float()) * (7 / 3)
    by_peft = (t_x @ torch.from_numpy(w).to(dtype.torch).T + t_update).to(dtype.torch)
    assert str(by_mlx.dtype).endswith(dtype.name) and by_peft.dtype == dtype.torch
    for name, values in {"mlx": to_numpy(by_mlx), "peft": by_peft.double().numpy()}.items():
        assert compare("output", name, values, expected).passed, name
    # The same term computed in the half dtype (A and B cast down) is off by more than the float32 term may be.
    cast_down = (mx_x @ mlx_array(a, FLOAT32).astype(mx_x.dtype)) @ mlx_array(b, FLOAT32).astype(mx_x.dtype)
    assert not compare("update", "mlx", to_numpy((7 / 3) * cast_down), update).passed


def test_steps_checks_judge_every_drawn_case_and_leave_out_trajectories_that_overflow():
    """The optimizer-step checks judge a case only if its float64 trajectory stays far inside the dtype's range
    (`CheckInfo.judges`); the suite's own cases all do; x and W of 2**20 (AdamW squares the gradients) or
    2**40 do not, and replaying such a case is refused."""
    drawn: list[LinearCase] = []
    sampling.draw_chunk(linear_cases(FLOAT32).filter(gradients_fit), 0, 0, 100, drawn.append)
    steps = {name: LINEAR.checks_on()[name] for name in ("steps_sgd", "steps_adamw")}
    for check in steps.values():
        assert all(check.applies(case) for case in drawn)
    sizes = {"in_features": 8, "out_features": 16, "r": 4, "batch_shape": [3]}

    def weighing(scale: float) -> dict:
        return {**drawn[0].describe(), **sizes, "magnitudes": [scale, scale, 1.0, 1.0]}

    assert steps["steps_sgd"].applies(case_from_description(weighing(2.0**20)))
    assert not steps["steps_adamw"].applies(case_from_description(weighing(2.0**20)))
    assert not steps["steps_sgd"].applies(case_from_description(weighing(2.0**40)))
    spec = {"subject": CORRECT[0].name, "check": "steps_adamw", "case": weighing(2.0**20)}
    with pytest.raises(SystemExit) as refused:
        replay.main([json.dumps(spec)])
    assert refused.value.code == 2


def test_allowed_error_is_zero_for_exact_values_so_any_change_fails():
    bias = Tracked.exact(np.array([0.5, -2.0]), FLOAT32)
    assert np.all(allowed_error(bias) == 0)
    assert compare("bias", "subject", np.array([0.5, -2.0]), bias).passed
    assert not compare("bias", "subject", np.array([0.5, np.nextafter(-2.0, 0)]), bias).passed


def test_a_bound_narrowed_to_a_kernel_allows_that_kernel_s_error_within_the_worst_case_and_never_below_the_floor():
    worst_case = Tracked(np.ones(4), np.full(4, 0.5), FLOAT32)
    floor = Tracked(np.ones(4), np.array([0.01, 0.2, 0.01, 0.01]), FLOAT32)
    observed = np.array([1.1, 1.1, 2.0, np.nan])  # within; within, below the floor; beyond the worst case; broken
    narrowed = worst_case.narrowed_to(observed, floor)
    np.testing.assert_allclose(narrowed.bound, [0.1, 0.2, 0.5, 0.5])
    np.testing.assert_array_equal(narrowed.value, worst_case.value)


def test_comparison_reports_shape_dtype_and_nan_as_failures():
    y = Tracked.exact(np.ones((2, 3)), FLOAT32)
    assert "shape is (3, 2)" in compare("y", "subject", np.ones((3, 2)), y).describe()
    wrong_dtype = compare_dtype("y", "subject", "float16", y)
    assert not wrong_dtype.passed and wrong_dtype.failure == "dtype"
    assert "dtype is float16, but should be float32" in wrong_dtype.describe()
    assert compare_dtype("y", "subject", "float32", y).passed
    nan = np.ones((2, 3))
    nan[1, 2] = np.nan
    result = compare("y", "subject", nan, y)
    assert not result.passed and result.worst_index == (1, 2)


def test_the_very_non_finite_value_expected_is_no_error_and_any_other_is():
    """A re-quantization is held to the quantization of the subject's own merge, which may hold NaN or inf (a DoRA
    norm that underflowed in float16 was found so): the same value there agrees, another fails."""
    expected = Tracked.exact(np.array([np.nan, np.inf, 1.0]), FLOAT16)
    assert compare("w", "subject", np.array([np.nan, np.inf, 1.0]), expected).passed
    assert not compare("w", "subject", np.array([1.0, np.inf, 1.0]), expected).passed
    assert not compare("w", "subject", np.array([np.nan, -np.inf, 1.0]), expected).passed


@given(shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=5), data=st.data())
def test_the_worst_element_is_reported_at_its_index_in_every_shape(shape, data):
    flat = data.draw(st.integers(0, int(np.prod(shape)) - 1))
    observed = np.zeros(shape)
    observed.flat[flat] = 1.0
    result = compare("y", "subject", observed, Tracked.exact(np.zeros(shape), FLOAT32))
    assert result.worst_index == tuple(int(i) for i in np.unravel_index(flat, shape))
    assert all(type(i) is int for i in result.worst_index)


def test_failure_message_says_what_got_and_what_it_should_be():
    y = Tracked.exact(np.array([[1.0, 2.0]]), FLOAT32).scaled(3.0)
    text = compare("output", "subject", np.array([[3.0, 7.0]]), y).describe()
    assert text.startswith("subject output[0, 1]=7, but should be 6 (error 1")


STATISTICAL = {"dropout_scaling"}
"""Checks whose margin is a statistic's (a correct layer exceeds 1 with probability 1e-9), not rounding's."""


@pytest.fixture
def default_profile():
    """The default profile's case space (its sizes), whatever profile an earlier test on this worker loaded."""
    before = settings.get_current_profile_name()
    settings.load_profile(profiles.DEFAULT)
    yield
    settings.load_profile(before)


@DTYPES
def test_correct_layer_uses_well_under_the_allowed_error(dtype, default_profile):
    """A small false-alarm study that runs with every test run (issue 7 measures it at scale)."""
    margins = []
    for subject in CORRECT:

        @settings(max_examples=150, derandomize=True, database=None, deadline=None)
        @given(case=FAMILIES[subject.family].study_cases(dtype))
        def run(case):
            for name, check in FAMILIES[subject.family].checks_on().items():
                if not check.runs_in(dtype.name) or not check.applies(case):
                    continue
                sides = _judged_sides(subject, name, dtype)
                judged = [c for c in check.run(subject, case).comparisons if c.side in sides]
                worst = max(judged, key=lambda c: (not c.passed, c.margin))
                assert worst.passed, worst.describe()
                if name not in STATISTICAL:
                    margins.append((worst.margin, f"{subject.name} {name}: {worst.describe()}"))

        run()
    largest, where = max(margins)
    assert 0 < largest <= 0.75, f"largest margin {largest:.3f} ({where}); CALIBRATION={CALIBRATION}"


def _judged_sides(subject, check: str, dtype: DType) -> set[str]:
    """The sides whose margins measure the verdict: both, but not peft's where a known divergence says peft loses
    precision in this check (its margins there are peft's, not rounding's)."""
    check_id = FAMILIES[subject.family].on("float").check_id(check, subject.name, dtype.name)
    entries = divergences.covering(divergences.load(divergences.DEFAULT_PATH, sampling.mlx_device()), check_id)
    return {"subject"} if any(entry.explanation.side == "reference" for entry in entries) else {"subject", "reference"}


@DTYPES
def test_a_lora_term_one_percent_off_is_caught_when_it_dominates(dtype):
    """Detection: a 1% (float32: 1e-4) error in a dominant LoRA term is far outside the allowed error."""
    rng = np.random.default_rng(1)
    x = Tracked.exact(round_to(rng.standard_normal((8, 64)), dtype), dtype)
    a = Tracked.exact(round_to(rng.standard_normal((64, 8)) / 8, dtype), dtype)
    b = Tracked.exact(round_to(rng.standard_normal((8, 32)), dtype), dtype)
    expected = (x @ a).scaled_matmul(b, 2.0)
    relative = 1e-4 if dtype is FLOAT32 else 1e-2 if dtype is FLOAT16 else 5e-2
    wrong = expected.value * (1 + relative)
    assert not compare("output", "subject", wrong, expected).passed


def test_mlx_default_device_is_a_known_one():
    assert mx.default_device() in (mx.Device(mx.cpu), mx.Device(mx.gpu))


def test_an_exact_zero_times_an_unbounded_error_adds_nothing_to_a_product_s_bound():
    """A weight row whose norm's bound reaches the norm itself is unbounded after the division; an input element
    that is exactly 0 multiplies it exactly, and the product's bound is inf where the row reaches, never NaN."""
    x = Tracked.exact(np.array([[0.0, 1.0], [1.0, 0.0]]), FLOAT32)
    weight = Tracked(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[np.inf, 0.0], [0.0, 1e-3]]), FLOAT32)
    product = x @ weight
    assert not np.isnan(product.bound).any()
    assert np.isfinite(product.bound[0]).all() and product.bound[1, 0] == np.inf and product.bound[1, 1] < 1e-6
