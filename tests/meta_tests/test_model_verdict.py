"""The whole-model verdict (`foundation.model_verdict`): the subject's error is held to the reference's own, in the
worst of its orders, and never below one rounding of the logits."""

import numpy as np
import pytest

from foundation.dtypes import BFLOAT16, FLOAT32
from foundation.model_verdict import MARGIN, compare_whole, rms

RNG = np.random.default_rng(0)
ORACLE = RNG.standard_normal((2, 5, 40))


def _off_by(relative: float) -> np.ndarray:
    return ORACLE + relative * rms(ORACLE) * RNG.standard_normal(ORACLE.shape)


def test_an_error_within_margin_times_the_reference_s_passes_and_beyond_it_fails():
    reference = _off_by(1e-3)
    within = compare_whole("logits", ORACLE + 0.9 * MARGIN * (reference - ORACLE), [reference], ORACLE, FLOAT32)
    beyond = compare_whole("logits", ORACLE + 1.1 * MARGIN * (reference - ORACLE), [reference], ORACLE, FLOAT32)
    assert within.passed and within.margin == pytest.approx(0.9)
    assert not beyond.passed and beyond.failure == "beyond" and "but should be at most" in beyond.describe()


def test_the_yardstick_is_the_reference_s_worst_order():
    """A correct implementation may take the order that costs most (a merge's update rounded first, attention scores
    stored in the model's dtype): the reference's error in that order is what it may be held to."""
    precise, coarse = _off_by(1e-4), _off_by(1e-2)
    subject = ORACLE + 2 * (coarse - ORACLE)
    assert not compare_whole("logits", subject, [precise], ORACLE, FLOAT32).passed
    assert compare_whole("logits", subject, [precise, coarse], ORACLE, FLOAT32).passed


def test_a_reference_that_happens_to_be_exact_still_leaves_one_rounding_of_the_logits():
    one_rounding = BFLOAT16.unit_roundoff * rms(ORACLE)
    subject = ORACLE + 0.5 * MARGIN * one_rounding * np.sign(RNG.standard_normal(ORACLE.shape))
    assert compare_whole("logits", subject, [ORACLE.copy()], ORACLE, BFLOAT16).passed


def test_non_finite_logits_and_wrong_shapes_fail_with_what_is_wrong():
    broken = ORACLE.copy()
    broken[0, 0, 0] = np.nan
    found = compare_whole("logits", broken, [ORACLE], ORACLE, FLOAT32)
    assert not found.passed and found.failure == "non-finite" and found.non_finite == 1
    shaped = compare_whole("logits", ORACLE[:, :4], [ORACLE], ORACLE, FLOAT32)
    assert shaped.failure == "shape" and "but should be (2, 5, 40)" in shaped.describe()


def test_the_detection_study_s_smallest_caught_error_is_where_the_verdict_turns():
    """`studies.model_detection` solves for the scale error the verdict catches in both directions: just below it, one
    direction still passes; just above it, both fail."""
    from studies.model_detection import smallest_caught

    error, contribution = 1e-3 * RNG.standard_normal(ORACLE.shape), RNG.standard_normal(ORACLE.shape)
    allowed = 2 * rms(error)
    e = smallest_caught(error, contribution, allowed)

    def caught(e: float) -> bool:
        return all(rms(error + sign * e * contribution) > allowed for sign in (1, -1))

    assert 0 < e < float("inf") and caught(1.001 * e) and not caught(0.999 * e)
    assert smallest_caught(error, np.zeros_like(error), allowed) == float("inf")
    assert smallest_caught(error, contribution, 0.5 * rms(error)) == 0.0
