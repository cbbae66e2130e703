"""Hints that name a recognisable pattern in a failure: a scaled LoRA term, a dropped bias, a transpose."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from foundation import weights
from foundation.cases import EmbeddingCase, LinearCase
from foundation.dtypes import round_to
from foundation.switch_cases import Case, SwitchCase
from foundation.verdict import VALUES, Measurement, Tracked, allowed_error, compare
from reference import oracle


def scalar_multiple(observed: np.ndarray, expected: np.ndarray, allowed: np.ndarray) -> float | None:
    """k such that ``observed ≈ k * expected`` within `allowed` (scaled by |k|), if there is one."""
    energy = float(np.sum(expected * expected))
    if observed.shape != expected.shape or energy == 0.0 or not np.all(np.isfinite(observed)):
        return None
    k = float(np.sum(observed * expected)) / energy
    if np.all(np.abs(observed - k * expected) <= allowed * max(1.0, abs(k))):
        return k
    return None


def _readings(case: LinearCase) -> dict[str, float]:
    """The factors a LoRA term is commonly off by, each with what it usually means."""
    s, r = case.scale, case.r
    return {
        "0: the LoRA term is missing": 0.0,
        "-1: the LoRA term has the wrong sign": -1.0,
        "r: the raw alpha is used where alpha / r belongs": float(r),
        "1/r": 1.0 / r,
        "sqrt(r): the rsLoRA and plain scaling rules are swapped": math.sqrt(r),
        "1/sqrt(r): the rsLoRA and plain scaling rules are swapped": 1.0 / math.sqrt(r),
        "scale: the scale is applied twice": s,
        "1/scale: the scale is not applied": 1.0 / s,
    }


def _explain_factor(k: float, case: LinearCase) -> str:
    """What a LoRA term k times too large usually means."""
    matches = [reading for reading, factor in _readings(case).items() if _same_factor(k, factor)]
    return f" (= {'; or '.join(matches)})" if matches else ""


def _same_factor(k: float, factor: float) -> bool:
    return abs(k - factor) <= 1e-2 * max(1.0, abs(factor))


def _factor_hint(what: str, k: float | None, case: LinearCase, elements: int) -> list[str]:
    if k is None or abs(k - 1.0) < 1e-3:
        return []
    reading = _explain_factor(k, case)
    if elements < 2 and not reading:
        return []  # one element is a multiple of anything: only a recognised factor says something
    return [f"{what} is {k:.3f}× peft's{reading}"]


def _bias_hint(difference: np.ndarray, case: LinearCase, allowed: np.ndarray) -> list[str]:
    if not case.has_bias or not case.bias.any():
        return []
    if np.all(np.abs(difference - case.bias) <= allowed):
        return ["the output is off by exactly the bias: the bias is added twice"]
    if np.all(np.abs(difference + case.bias) <= allowed):
        return ["the output is off by exactly minus the bias: the bias is dropped"]
    return []


def _half_precision_norm_failures(case: LinearCase) -> str:
    """Rows whose norm under- or overflows, or loses precision to squares below the normal range, when the
    squares are formed in the case dtype."""
    adapted = round_to(weights.adapted_weight(case).value, case.dtype)
    exact = adapted * adapted
    squares = round_to(exact, case.dtype)
    norms = np.sqrt(round_to(np.sum(squares, axis=-1), case.dtype))  # the sum overflows where its terms do not
    subnormal = np.any((exact != 0) & (exact < case.dtype.smallest_normal), axis=-1)
    broken = np.flatnonzero((norms == 0) | ~np.isfinite(norms) | subnormal)
    if broken.size == 0:
        return ""
    if np.any(~np.isfinite(norms[broken])):
        kind = "overflows"
    elif np.any(norms[broken] == 0):
        kind = "underflows"
    else:
        kind = "loses precision (squares below the normal range)"
    rows = ", ".join(map(str, broken[:5])) + (", ..." if broken.size > 5 else "")
    return (
        f"the weight norm {kind} in {case.dtype} for output rows {rows}: the subject squares "
        f"{case.dtype} values in {case.dtype}, peft squares them in float32"
    )


def norm_hints(case: LinearCase) -> list[str]:
    """Where a DoRA layer's failure may come from its weight norm in half precision."""
    norm_failure = _half_precision_norm_failures(case) if case.use_dora else ""
    return [norm_failure] if norm_failure else []


def _dora_hints(case: LinearCase, output: np.ndarray, allowed: np.ndarray) -> list[str]:
    unbiased = case.x @ case.weight.T + oracle.lora_update(case).value
    bias = case.bias if case.has_bias else 0.0
    alternatives = {
        "the weight norm is taken from W alone, without the adapter": case.magnitude
        / np.linalg.norm(case.weight, axis=1),
        "the magnitude m is not applied (no m / ||W + s B A|| factor)": np.ones_like(case.magnitude),
    }
    hints = [
        text for text, factor in alternatives.items() if np.all(np.abs(factor * unbiased + bias - output) <= allowed)
    ]
    return hints + norm_hints(case)


def forward_hints(case: LinearCase, output: np.ndarray) -> list[str]:
    """Patterns in a subject's forward output that disagrees with the oracle."""
    expected = oracle.linear_forward(case)
    if output.shape != expected.value.shape:
        return []
    allowed = allowed_error(expected)
    if case.use_dora:
        return _dora_hints(case, output, allowed)
    bias = _bias_hint(output - expected.value, case, allowed)
    if bias:
        return bias
    lora_term = output - oracle.linear_base(case).value
    k = scalar_multiple(lora_term, oracle.lora_update(case).value, allowed)
    return _factor_hint("the LoRA term", k, case, output.size)


def merge_hints(case: LinearCase, weight: np.ndarray) -> list[str]:
    """Patterns in a subject's merged weight (out, in) that disagrees with the oracle."""
    if case.use_dora:
        return norm_hints(case)
    expected = oracle.merged_weight(case)
    allowed = allowed_error(expected)
    delta = weights.lora_delta(case).value
    if weight.shape == expected.value.T.shape and weight.shape != expected.value.shape:
        if np.all(np.abs(weight.T - expected.value) <= allowed.T):
            return ["the merged weight is the transpose of peft's"]
        return ["the merged weight has the transposed shape (in, out)"]
    if weight.shape != expected.value.shape:
        return []
    update = weight - case.weight
    hints = _factor_hint("the merged LoRA update", scalar_multiple(update, delta, allowed), case, update.size)
    symmetric = np.all(np.abs(delta - delta.T) <= allowed) if delta.shape[0] == delta.shape[1] else True
    if not hints and not symmetric and np.all(np.abs(update - delta.T) <= allowed):
        hints.append("the merged LoRA update is transposed (s A^T B^T instead of s B A)")
    return hints


_CREATED = re.compile(r"the layer created (\w+) with shape \((\d+), (\d+)\)")


def adapter_width_hints(case: LinearCase, problems: list[str]) -> list[str]:
    """Name the packed-width mistake when a layer on a quantized base sized its adapter wrongly."""
    q = case.quantization
    created = next((m for m in map(_CREATED.search, problems) if m), None)
    if q is None or created is None:
        return []
    rows, packed = int(created.group(2)), case.in_features * q.bits // 32
    if case.in_features * q.bits % 32 or rows != packed * (32 // q.bits):
        return []
    return [
        f"the input width is taken as packed width x (32 // bits) = {packed} x {32 // q.bits} = {rows}; "
        f"with {q.bits} bits it is packed width x 32 // bits = {case.in_features}"
    ]


def _exact(case: LinearCase, values: np.ndarray) -> Tracked:
    return Tracked.exact(values, case.dtype)


def dropout_hints(case: LinearCase, output: np.ndarray, mask: Callable[[tuple[int, ...]], np.ndarray]) -> list[str]:
    """Where a subject's dropout acted, when the dropout check found it elsewhere than peft's: each known
    placement evaluated with the same keep-mask, and the one the output matches."""
    x = _exact(case, case.x)
    dropped = oracle.dropped_input(case, mask(case.x.shape))
    base, lora = oracle.linear_base(case), oracle.lora_update(case, dropped)
    output_mask = Tracked.exact(mask(base.value.shape), case.dtype)
    placements = {
        "the output is the eval one: the subject applies no dropout in training mode": oracle.linear_forward(case),
        "dropout acts on the LoRA term's output, not on its input": base
        + (oracle.lora_update(case) * output_mask).scaled(1 / (1 - case.dropout)),
    }
    if case.use_dora:
        factor = oracle.dora_factor(case)
        scaled_sum = factor * (x @ _exact(case, case.weight).T + lora)
        placements[
            "the magnitude scales the base output of the whole input, f (x W^T + s (x' A^T) B^T) + b; peft takes "
            "the (f - 1) x' W^T correction from the dropped input"
        ] = scaled_sum + _exact(case, case.bias) if case.has_bias else scaled_sum
    else:
        dropped_case = replace(case, x=round_to(case.x * mask(case.x.shape) / (1 - case.dropout), case.dtype))
        placements["dropout acts on the base layer's input too"] = oracle.linear_forward(dropped_case)
    return [
        text
        for text, expected in placements.items()
        if expected.value.shape == output.shape and np.all(np.abs(output - expected.value) <= allowed_error(expected))
    ]


def adapter_in_base_dtype(case: Case) -> Case:
    """The case with its adapter (A, B, DoRA's m) rounded to the base's dtype: what a layer is right for that
    casts a float32 adapter down, or computes its update in the base's dtype (an embedding's lookup, each of a
    switch layer's experts)."""
    if isinstance(case, EmbeddingCase):
        return replace(case, lookup=adapter_in_base_dtype(case.lookup))
    if isinstance(case, SwitchCase):
        return replace(case, experts=tuple(adapter_in_base_dtype(expert) for expert in case.experts))
    dtype = case.dtype
    magnitude = None if case.magnitude is None else round_to(case.magnitude, dtype)
    rounded = {"lora_A": round_to(case.lora_A, dtype), "lora_B": round_to(case.lora_B, dtype), "magnitude": magnitude}
    return replace(case, adapter_dtype=dtype, **rounded)


def _adapted_linear(case: Case) -> LinearCase | None:
    """The linear layer whose LoRA scale a case's formulas use: an embedding's lookup, a switch layer's first
    expert (its experts share r and alpha), the case itself."""
    if isinstance(case, EmbeddingCase):
        return case.lookup
    if isinstance(case, SwitchCase):
        return case.experts[0] if case.experts else None
    return case if isinstance(case, LinearCase) else None


def with_scale_times(case: Case, factor: float) -> Case:
    """The case with its LoRA scale `factor` times its own (alpha scaled: every scaling rule is linear in it)."""
    if isinstance(case, EmbeddingCase):
        return replace(case, lookup=with_scale_times(case.lookup, factor))
    if isinstance(case, SwitchCase):
        return replace(case, experts=tuple(with_scale_times(expert, factor) for expert in case.experts))
    return replace(case, alpha=case.alpha * factor)


def scale_hints(case: Case, measurement: Measurement, observed: dict, expect: Callable[[Case], dict]) -> list[str]:
    """Where every value the subject got wrong agrees with the check's formulas for the case with its LoRA scale
    off by a recognised factor (`_readings`): the ratio diagnosis of checks whose quantity is not a LoRA term alone
    (gradients, dropout, optimizer steps) or not an exact multiple of it (a quantized base in half precision)."""
    linear = _adapted_linear(case)
    valued = [c for c in measurement.comparisons if c.side == "subject" and c.kind == VALUES]
    wrong = {c.quantity for c in valued if not c.passed}
    compared = {c.quantity for c in valued}  # the factor must explain the values it got right too
    if linear is None or not wrong or not compared <= observed.keys():
        return []
    matches = {}
    for reading, factor in _readings(linear).items():
        if _same_factor(factor, 1.0):
            continue
        try:
            expected = expect(with_scale_times(case, factor))
        except Exception:  # noqa: BLE001 - a diagnosis that cannot be made is no finding
            continue
        if all(
            expected.get(q) is not None and compare(q, "subject", observed[q][0], expected[q]).passed for q in compared
        ):
            matches[reading] = factor
    factors = set(matches.values())
    if not matches or any(not _same_factor(f, min(factors)) for f in factors):
        return []  # none, or several factors at once: the bound cannot tell them apart
    return [
        f"{', '.join(sorted(wrong))} agree with a LoRA scale {min(factors):.3f}× peft's (= {'; or '.join(matches)})"
    ]


_SIDES = {"subject": "the subject's", "reference": "peft's"}


def precision_hints(
    case: Case, measurement: Measurement, observed: dict, expect: Callable[[Case], dict], side: str = "subject"
) -> list[str]:
    """Where one side (`side`) fails with a float32 adapter on a half-precision base: whether every value it got
    wrong agrees with the formulas for the adapter rounded to the base's dtype (`adapter_in_base_dtype`), in which
    case the precision is lost there. `expect` is the check's expectation of a case."""
    if not case.mixed:
        return []
    wrong = {c.quantity for c in measurement.comparisons if c.side == side and c.kind == VALUES and not c.passed}
    if not wrong or not wrong <= observed.keys():
        return []
    try:
        expected = expect(adapter_in_base_dtype(case))
    except Exception:  # noqa: BLE001 - a diagnosis that cannot be made is no finding
        return []
    for quantity in wrong:
        want = expected.get(quantity)
        if want is None or not compare(quantity, side, observed[quantity][0], want).passed:
            return []
    return [
        f"{_SIDES[side]} {', '.join(sorted(wrong))} agree with the float32 adapter rounded to {case.dtype}: the "
        f"update is computed in {case.dtype} (or the adapter was cast down to it)"
    ]
