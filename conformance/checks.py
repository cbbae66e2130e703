"""The checks: each runs one property on the subject, the reference and the oracle for one case.

A check never raises because of the subject or the reference: an exception, a wrong shape or a
wrong dtype becomes a failing comparison that says what happened, so one broken subject cannot stop
the run. The caller records the `Measurement` and then asserts it.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np
import torch

from conformance import diagnosis
from conformance.cases import LinearCase
from conformance.subjects import Subject
from conformance.timing import UNTIMED, PhaseTimer
from conformance.verdict import Measurement, Tracked, compare, failed
from reference import bridge, oracle, peft_layers

Observed = dict[str, tuple[np.ndarray, "str | None"]]
"""quantity -> (values as float64, dtype name or None where the dtype is not judged), as one side produced them."""


def _from_mlx(values: mx.array) -> tuple[np.ndarray, str]:
    return bridge.to_numpy(values), bridge.dtype_name(values)


def _from_torch(values: torch.Tensor) -> tuple[np.ndarray, str]:
    return peft_layers.to_numpy(values), peft_layers.dtype_name(values)


def _judge(
    measurement: Measurement, side: str, produce: Callable[[], Observed], expected: dict[str, Tracked | None]
) -> Observed:
    """Run one side, then compare each quantity it should produce with the oracle."""
    try:
        observed = produce()
    except Exception as error:  # noqa: BLE001 - any exception of a side is a finding
        measurement.comparisons.append(failed(f"raised {type(error).__name__}: {error}", measurement.check, side))
        return {}
    for quantity, want in expected.items():
        got = observed.get(quantity)
        if want is None and got is not None:
            measurement.comparisons.append(failed("is present, but should be absent", quantity, side))
        elif want is not None and got is None:
            measurement.comparisons.append(failed("is absent, but should be present", quantity, side))
        elif want is not None:
            measurement.comparisons.append(compare(quantity, side, got[0], want, got[1]))
    return observed


def forward(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's output in eval mode, against peft's and the oracle's."""
    measurement = Measurement(subject.name, "forward", case.describe())
    with timer("oracle"):
        expected = {"output": oracle.linear_forward(case)}

    def reference() -> Observed:
        return {"output": _from_torch(peft_layers.forward(peft_layers.linear(case), case))}

    def run_subject() -> Observed:
        output = subject.build(case)(bridge.mlx_array(case.x, case.dtype))
        mx.eval(output)
        return {"output": _from_mlx(output)}

    with timer("reference"):
        _judge(measurement, "reference", reference, expected)
    with timer("subject"):
        observed = _judge(measurement, "subject", run_subject, expected)
    if not measurement.passed and "output" in observed:
        measurement.hints += diagnosis.forward_hints(case, observed["output"][0])
    return measurement


def merge(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's merged layer (weight, bias, output) against peft's ``merge()`` and the oracle."""
    measurement = Measurement(subject.name, "merge", case.describe())
    with timer("oracle"):
        expected = {
            "merged weight": oracle.merged_weight(case),
            "merged bias": Tracked.exact(case.bias, case.dtype) if case.has_bias else None,
            "merged output": oracle.merged_forward(case),
        }

    def reference() -> Observed:
        layer = peft_layers.linear(case)
        layer.merge()
        base = layer.get_base_layer()
        observed = {"merged weight": _from_torch(base.weight), "merged output": _from_torch(peft_layers.forward(layer, case))}
        if base.bias is not None:
            observed["merged bias"] = _from_torch(base.bias)
        return observed

    def run_subject() -> Observed:
        merged = subject.merge(subject.build(case))
        output = merged(bridge.mlx_array(case.x, case.dtype))
        mx.eval(merged.parameters(), output)
        observed = {"merged weight": _from_mlx(merged.weight), "merged output": _from_mlx(output)}
        if "bias" in merged:
            observed["merged bias"] = _from_mlx(merged["bias"])
        return observed

    with timer("reference"):
        _judge(measurement, "reference", reference, expected)
    with timer("subject"):
        observed = _judge(measurement, "subject", run_subject, expected)
    weight_failed = any(c.side == "subject" and c.quantity == "merged weight" and not c.passed for c in measurement.comparisons)
    if weight_failed and "merged weight" in observed:
        measurement.hints += diagnosis.merge_hints(case, observed["merged weight"][0])
    return measurement


def _magnitude_at_creation(subject: Subject, case: LinearCase, timer: PhaseTimer, with_adapter: bool) -> Measurement:
    check = "init_with_adapter" if with_adapter else "init"
    measurement = Measurement(subject.name, check, case.describe())
    with timer("oracle"):
        norm = oracle.adapted_weight(case).row_norm() if with_adapter else oracle.magnitude_at_init(case)
        expected = {"magnitude": norm}
    # Values only: MLX keeps m in float32 where peft keeps the layer's dtype; both are exact enough.

    def reference() -> Observed:
        return {"magnitude": (peft_layers.to_numpy(peft_layers.dora_magnitude_at_creation(case, with_adapter)), None)}

    def run_subject() -> Observed:
        magnitude = subject.magnitude_at_creation(case, with_adapter)
        mx.eval(magnitude)
        return {"magnitude": (bridge.to_numpy(magnitude), None)}

    with timer("reference"):
        _judge(measurement, "reference", reference, expected)
    with timer("subject"):
        _judge(measurement, "subject", run_subject, expected)
    return measurement


def init(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """DoRA's magnitude as derived when the layer is created on a base (B zero): ``||W||`` per output."""
    return _magnitude_at_creation(subject, case, timer, with_adapter=False)


def init_with_adapter(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """DoRA's magnitude as derived with a non-zero B already in place: ``||W + s B A||`` per output."""
    return _magnitude_at_creation(subject, case, timer, with_adapter=True)


Check = Callable[[Subject, LinearCase, PhaseTimer], Measurement]
CHECKS: dict[str, Check] = {"forward": forward, "merge": merge, "init": init, "init_with_adapter": init_with_adapter}
FAMILY_CHECKS: dict[str, tuple[str, ...]] = {
    "linear": ("forward", "merge"),
    "dora_linear": ("forward", "merge", "init", "init_with_adapter"),
}
