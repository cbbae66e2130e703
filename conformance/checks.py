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

from conformance import diagnosis, dropout_statistics, optimizers, quantization
from conformance.cases import EmbeddingCase, LinearCase, dropout_mask, upstream_gradient
from conformance.quantization import Quantization
from conformance.subjects import Subject
from conformance.switch_cases import SwitchCase, switch_upstream_gradient
from conformance.timing import UNTIMED, PhaseTimer
from conformance.verdict import Comparison, Measurement, Tracked, compare, failed
from reference import bridge, oracle, peft_layers, trajectory

Observed = dict[str, tuple[np.ndarray, "str | None"]]
"""quantity -> (values as float64, dtype name or None where the dtype is not judged), as one side produced them."""
Expected = dict[str, "Tracked | None"]
"""quantity -> the oracle's value and bound, or None where the quantity must be absent."""


def _from_mlx(values: mx.array, judge_dtype: bool = True) -> tuple[np.ndarray, str | None]:
    return bridge.to_numpy(values), bridge.dtype_name(values) if judge_dtype else None


def _from_torch(values: torch.Tensor, judge_dtype: bool = True) -> tuple[np.ndarray, str | None]:
    return peft_layers.to_numpy(values), peft_layers.dtype_name(values) if judge_dtype else None


def _judge(measurement: Measurement, side: str, produce: Callable[[], Observed], expected: Expected) -> Observed:
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


def _run(
    check: str,
    subject: Subject,
    case: LinearCase | EmbeddingCase,
    timer: PhaseTimer,
    expect: Callable[[], Expected],
    reference: Callable[[], Observed],
    run_subject: Callable[[], Observed],
    diagnose: Callable[[Measurement, Observed], list[str]] | None = None,
) -> Measurement:
    measurement = Measurement(subject.name, check, case.describe())
    with timer("oracle"):
        expected = expect()
    with timer("reference"):
        _judge(measurement, "reference", reference, expected)
    with timer("subject"):
        observed = _judge(measurement, "subject", run_subject, expected)
    if diagnose is not None and not measurement.passed:
        measurement.hints += diagnose(measurement, observed)
    return measurement


def _evaluated(*arrays: mx.array) -> None:
    mx.eval(*arrays)


# Linear base ---------------------------------------------------------------------------------


def forward(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's output in eval mode, against peft's and the oracle's."""

    def run_subject() -> Observed:
        output = subject.build(case)(bridge.mlx_array(case.x, case.dtype))
        _evaluated(output)
        return {"output": _from_mlx(output)}

    def diagnose(measurement: Measurement, observed: Observed) -> list[str]:
        if "output" in observed:
            return diagnosis.forward_hints(case, observed["output"][0])
        return diagnosis.adapter_width_hints(case, [c.problem for c in measurement.comparisons if c.problem])

    return _run(
        "forward", subject, case, timer,
        expect=lambda: {"output": oracle.linear_forward(case)},
        reference=lambda: {"output": _from_torch(peft_layers.forward(peft_layers.linear(case), case))},
        run_subject=run_subject,
        diagnose=diagnose,
    )


def merge(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's merged layer (weight, bias, output) against peft's ``merge()`` and the oracle."""

    def expect() -> Expected:
        return {
            "merged weight": oracle.merged_weight(case),
            "merged bias": Tracked.exact(case.bias, case.dtype) if case.has_bias else None,
            "merged output": oracle.merged_forward(case),
        }

    def reference() -> Observed:
        layer = peft_layers.linear(case)
        layer.merge()
        base = layer.get_base_layer()
        weight = peft_layers.base_weight(layer, case)
        observed = {"merged weight": _from_torch(weight), "merged output": _from_torch(peft_layers.forward(layer, case))}
        if base.bias is not None and (case.has_bias or not case.fan_in_fan_out):
            observed["merged bias"] = _from_torch(base.bias)
        return observed

    def run_subject() -> Observed:
        merged = subject.merge(subject.build(case))
        output = merged(bridge.mlx_array(case.x, case.dtype))
        _evaluated(merged.parameters(), output)
        observed = {"merged weight": _from_mlx(merged.weight), "merged output": _from_mlx(output)}
        if "bias" in merged:
            observed["merged bias"] = _from_mlx(merged["bias"])
        return observed

    def diagnose(measurement: Measurement, observed: Observed) -> list[str]:
        if _failed(measurement, "merged weight") and "merged weight" in observed:
            return diagnosis.merge_hints(case, observed["merged weight"][0])
        return []

    return _run("merge", subject, case, timer, expect, reference, run_subject, diagnose)


def _failed(measurement: Measurement, quantity: str) -> bool:
    return any(c.side == "subject" and c.quantity == quantity and not c.passed for c in measurement.comparisons)


def requantize(subject: Subject, case: LinearCase | EmbeddingCase | SwitchCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """``fuse(dequantize=False)`` on a quantized base is exactly ``quantize(fuse(dequantize=True))``.

    The merge check holds the dequantized merge to peft and the oracle; re-quantizing it then loses
    exactly the re-quantization error, which this check allows and nothing more: a re-quantized merge
    that dropped the adapter, or re-quantized in another mode, bit width or group size, fails. peft has
    no re-quantizing merge, so there is no reference side.
    """
    measurement = Measurement(subject.name, "requantize", case.describe())
    q = case.quantization
    with timer("subject"):
        try:
            layer = subject.build(case)
            dequantized = subject.merge(layer, dequantize=True).weight
            requantized = subject.merge(layer, dequantize=False)
            if "scales" not in requantized:
                raise TypeError(f"fuse(dequantize=False) returned a {type(requantized).__name__}, not a quantized layer")
            settings = Quantization(requantized.mode, requantized.bits, requantized.group_size)
            biases = () if requantized.get("biases") is None else (requantized.biases,)
            dtype = getattr(mx, case.dtype.name)
            observed = quantization.dequantize((requantized.weight, requantized.scales, *biases), settings, dtype)
            expected = quantization.dequantize(quantization.quantize(dequantized, q), q, dtype)
            _evaluated(observed, expected)
            # An affine re-quantization keeps its scales in a floating dtype: the base's, as peft keeps it.
            scales_dtype = bridge.dtype_name(requantized.scales) if q.mode == "affine" else case.dtype.name
        except Exception as error:  # noqa: BLE001 - any exception of the subject is a finding
            measurement.comparisons.append(failed(f"raised {type(error).__name__}: {error}", "requantize", "subject"))
            return measurement
    if settings != q:
        measurement.comparisons.append(failed(f"re-quantized as {settings}, but should be {q}", "requantized weight", "subject"))
        return measurement
    want = Tracked.exact(bridge.to_numpy(expected), case.dtype)
    measurement.comparisons.append(compare("requantized weight", "subject", bridge.to_numpy(observed), want, scales_dtype))
    return measurement


def _gradients(
    subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer, bias_trains: bool
) -> Measurement:
    embedding = isinstance(case, EmbeddingCase)
    upstream = upstream_gradient(case.lookup if embedding else case)
    trained: dict[str, set[str]] = {}

    def expect() -> Expected:
        return oracle.embedding_grads(case, upstream) if embedding else oracle.linear_grads(case, upstream, bias_trains)

    # DoRA's magnitude gradient has the magnitude's dtype: float32 in MLX, the layer's in peft.
    def reference() -> Observed:
        found, trained["reference"] = peft_layers.grads(case, upstream, bias_trains)
        return {name: _from_torch(values, judge_dtype=name != "grad m") for name, values in found.items()}

    def run_subject() -> Observed:
        found, trained["subject"] = bridge.grads(subject.build(case), subject.convention.roles, case, upstream, bias_trains)
        _evaluated(*found.values())
        return {name: _from_mlx(values, judge_dtype=name != "grad m") for name, values in found.items()}

    check = "grad_bias_all" if bias_trains else "grad"
    measurement = _run(check, subject, case, timer, expect, reference, run_subject)
    _compare_trainable(measurement, trained)
    return measurement


def _compare_trainable(measurement: Measurement, trained: dict[str, set[str]]) -> None:
    """A failing comparison where the subject trains other parameters (by role) than peft."""
    if "subject" not in trained or trained["subject"] == trained.get("reference"):
        return
    reference = trained.get("reference", set())
    problem = f"trains {sorted(trained['subject'])}, but should train {sorted(reference)} as peft does"
    measurement.comparisons.append(failed(problem, "trainable parameters", "subject"))
    measurement.hints.append(
        f"trainable only in the subject: {sorted(trained['subject'] - reference)}; only in peft: {sorted(reference - trained['subject'])}"
    )


def grad(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """Gradients of ``sum(y * T)`` (T fixed and random) for every adapter parameter (A, B, DoRA's m) and
    the input, in eval mode, against torch autograd through peft's layer and the float64 formulas; and
    the same set of trainable parameters as peft's (base frozen, ``bias="none"``)."""
    return _gradients(subject, case, timer, bias_trains=False)


def grad_bias_all(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """As `grad`, with peft's ``bias="all"``: the base's bias trains too (MLX: unfrozen), ``db = sum_rows(T)``."""
    return _gradients(subject, case, timer, bias_trains=True)


# Dropout ----------------------------------------------------------------------------------------


def dropout(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """Where dropout acts: both layers in training mode, every dropout module given the same keep-mask
    (a function of the shape it sees), against the formula with the adapter's input dropped (peft:
    ``x W^T + b + s (x' A^T) B^T``; DoRA as `oracle.linear_forward` says; peft's LoRA Embedding applies
    no dropout)."""
    embedding = isinstance(case, EmbeddingCase)
    view = case.lookup if embedding else case

    def mask(shape: tuple[int, ...]) -> np.ndarray:
        return dropout_mask(view, shape)

    def expect() -> Expected:
        if embedding:
            return {"output": oracle.embedding_forward(case)}
        return {"output": oracle.linear_forward(case, oracle.dropped_input(case, mask(case.x.shape)))}

    def reference() -> Observed:
        if embedding:
            layer = peft_layers.trained_with_mask(peft_layers.embedding(case), mask, view.dropout)
            return {"output": _from_torch(peft_layers.lookup(layer, case))}
        layer = peft_layers.trained_with_mask(peft_layers.linear(case), mask, case.dropout)
        return {"output": _from_torch(peft_layers.forward(layer, case))}

    def run_subject() -> Observed:
        layer = subject.build(case)
        if bridge.inject_dropout(layer, view.dropout, mask) == 0:
            raise LookupError("the layer has no mlx.nn.Dropout inside to give the mask to")
        layer.train()
        output = layer(mx.array(case.ids) if embedding else bridge.mlx_array(case.x, case.dtype))
        _evaluated(output)
        return {"output": _from_mlx(output)}

    def diagnose(measurement: Measurement, observed: Observed) -> list[str]:
        if "output" not in observed:
            return []
        return diagnosis.dropout_hints(view, observed["output"][0], mask)

    return _run("dropout", subject, case, timer, expect, reference, run_subject, diagnose)


def dropout_scaling(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's own dropout keeps the output's expectation (inverted dropout): the mean of
    `dropout_statistics.SAMPLES` training-mode outputs is the eval output, within a bound that a correct
    layer exceeds with probability `dropout_statistics.FALSE_ALARM`. No reference: this judges the
    subject's random masks, which peft cannot share."""
    measurement = Measurement(subject.name, "dropout_scaling", case.describe())
    with timer("subject"):
        try:
            layer = subject.build(case)
            x = bridge.mlx_array(case.x, case.dtype)
            evaluation = layer(x)
            layer.train()
            training = layer(mx.broadcast_to(x, (dropout_statistics.SAMPLES, *x.shape)))
            _evaluated(evaluation, training)
        except Exception as error:  # noqa: BLE001 - any exception of the subject is a finding
            measurement.comparisons.append(failed(f"raised {type(error).__name__}: {error}", "dropout_scaling", "subject"))
            return measurement
    with timer("oracle"):
        premise = compare("eval output", "subject", bridge.to_numpy(evaluation), oracle.linear_forward(case))
        if not premise.passed:  # the statistic's variance is the formula's; a wrong LoRA term breaks it
            problem = f"cannot be judged: the eval output disagrees with the formula (the forward check says how): {premise.describe()}"
            measurement.comparisons.append(failed(problem, "dropout_scaling", "subject"))
            return measurement
        comparison, ratio = dropout_statistics.judge(case, bridge.to_numpy(training), bridge.to_numpy(evaluation))
    measurement.comparisons.append(comparison)
    if not comparison.passed:
        measurement.hints.append(
            f"the training-mode LoRA term averages {ratio:.3g}x the eval one; inverted dropout keeps 1x, dropout "
            f"without the 1 / (1 - p) rescaling keeps 1 - p = {1 - case.dropout:.3g}x"
        )
    return measurement


# Optimizer steps ------------------------------------------------------------------------------


def _steps(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer, kind: str) -> Measurement:
    view = case.lookup if isinstance(case, EmbeddingCase) else case  # a lookup is the one-hot linear map
    target = optimizers.regression_target(view)
    spec = optimizers.optimizer_for(view, kind, trajectory.first_gradients(view, target))

    def by_step(adapters: list[dict], convert: Callable) -> Observed:
        return {f"{role} after step {k}": convert(values) for k, adapter in enumerate(adapters, 1) for role, values in adapter.items()}

    def expect() -> Expected:
        return by_step(trajectory.steps(view, spec, target, optimizers.STEPS), lambda tracked: tracked)

    def reference() -> Observed:
        return by_step(peft_layers.training_steps(case, spec, target, optimizers.STEPS), _from_torch)

    def run_subject() -> Observed:
        adapters = bridge.training_steps(subject.build(case), subject.convention.roles, case, spec, target, optimizers.STEPS)
        return by_step(adapters, _from_mlx)

    measurement = _run(f"steps_{kind}", subject, case, timer, expect, reference, run_subject)
    measurement.case.update(spec.describe())
    return measurement


def steps_sgd(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """A and B after each of a few SGD steps on a fixed regression problem, against torch's SGD on peft's
    layer and the float64 steps, within the error rounding accumulates over the steps."""
    return _steps(subject, case, timer, "sgd")


def steps_adamw(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """As `steps_sgd`, with AdamW (bias-corrected on both sides, decoupled weight decay)."""
    return _steps(subject, case, timer, "adamw")


# DoRA's magnitude -----------------------------------------------------------------------------


def _magnitude_at_creation(
    subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer, with_adapter: bool
) -> Measurement:
    view = case.lookup if isinstance(case, EmbeddingCase) else case

    def expect() -> Expected:
        norm = oracle.adapted_weight(view).row_norm() if with_adapter else oracle.magnitude_at_init(view)
        return {"magnitude": norm}

    # Values only: MLX keeps m in float32 where peft keeps the layer's dtype; both are exact enough.
    def reference() -> Observed:
        return {"magnitude": _from_torch(peft_layers.dora_magnitude_at_creation(case, with_adapter), judge_dtype=False)}

    def run_subject() -> Observed:
        magnitude = subject.magnitude_at_creation(case, with_adapter)
        _evaluated(magnitude)
        return {"magnitude": _from_mlx(magnitude, judge_dtype=False)}

    check = "init_with_adapter" if with_adapter else "init"
    return _run(check, subject, case, timer, expect, reference, run_subject)


def init(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """DoRA's magnitude as derived when the layer is created on a base (B zero): the base's norms."""
    return _magnitude_at_creation(subject, case, timer, with_adapter=False)


def init_with_adapter(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """DoRA's magnitude as derived with a non-zero B already in place: the adapted weight's norms."""
    return _magnitude_at_creation(subject, case, timer, with_adapter=True)


# Embedding base -------------------------------------------------------------------------------


def lookup(subject: Subject, case: EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's embeddings of the case's token ids, against peft's and the oracle's."""

    def run_subject() -> Observed:
        output = subject.build(case)(mx.array(case.ids))
        _evaluated(output)
        return {"output": _from_mlx(output)}

    return _run(
        "forward", subject, case, timer,
        expect=lambda: {"output": oracle.embedding_forward(case)},
        reference=lambda: {"output": _from_torch(peft_layers.lookup(peft_layers.embedding(case), case))},
        run_subject=run_subject,
    )


def as_linear(subject: Subject, case: EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """``as_linear`` (the tied output head) against ``hidden @ merged table^T`` from peft's merge."""

    def reference() -> Observed:
        layer = peft_layers.embedding(case)
        layer.merge()
        table = layer.get_base_layer().weight
        with torch.no_grad():
            return {"output": _from_torch(peft_layers.tensor(case.hidden, case.dtype) @ table.T)}

    def run_subject() -> Observed:
        output = subject.build(case).as_linear(bridge.mlx_array(case.hidden, case.dtype))
        _evaluated(output)
        return {"output": _from_mlx(output)}

    return _run("as_linear", subject, case, timer, lambda: {"output": oracle.embedding_as_linear(case)}, reference, run_subject)


def embedding_merge(subject: Subject, case: EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's merged table and its lookups against peft's ``merge()`` and the oracle."""

    def expect() -> Expected:
        table = oracle.embedding_merged_weight(case)
        return {"merged weight": table, "merged output": table[case.ids]}

    def reference() -> Observed:
        layer = peft_layers.embedding(case)
        layer.merge()
        return {
            "merged weight": _from_torch(layer.get_base_layer().weight),
            "merged output": _from_torch(peft_layers.lookup(layer, case)),
        }

    def run_subject() -> Observed:
        merged = subject.merge(subject.build(case))
        output = merged(mx.array(case.ids))
        _evaluated(merged.parameters(), output)
        return {"merged weight": _from_mlx(merged.weight), "merged output": _from_mlx(output)}

    return _run("merge", subject, case, timer, expect, reference, run_subject)


# Mixture-of-experts base ----------------------------------------------------------------------


def switch_forward(subject: Subject, case: SwitchCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """Each token's outputs from its k experts, against peft's and the oracle's.

    peft's reference is its LoRA on the experts' weight parameter (``target_parameters``), or one peft
    ``Linear`` per expert where peft refuses that (dropout > 0): see `peft_layers.switch`.
    """

    def run_subject() -> Observed:
        output = bridge.switch_call(subject.build(case), case)
        _evaluated(output)
        return {"output": _from_mlx(output)}

    return _run(
        "forward", subject, case, timer,
        expect=lambda: {"output": oracle.switch_forward(case)},
        reference=lambda: {"output": _from_torch(peft_layers.switch_forward(peft_layers.switch(case), case))},
        run_subject=run_subject,
    )


def switch_grad(subject: Subject, case: SwitchCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """Gradients of ``sum(y * T)`` for every expert's A and B and for x, against torch autograd through
    peft's switch reference and the float64 formulas; and the same trainable parameters (base frozen)."""
    upstream = switch_upstream_gradient(case)
    trained: dict[str, set[str]] = {}

    def reference() -> Observed:
        found, trained["reference"] = peft_layers.switch_grads(case, upstream)
        return {name: _from_torch(values) for name, values in found.items()}

    def run_subject() -> Observed:
        found, trained["subject"] = bridge.switch_grads(subject.build(case), subject.convention.roles, case, upstream)
        _evaluated(*found.values())
        return {name: _from_mlx(values) for name, values in found.items()}

    measurement = _run("grad", subject, case, timer, lambda: oracle.switch_grads(case, upstream), reference, run_subject)
    _compare_trainable(measurement, trained)
    return measurement


def switch_merge(subject: Subject, case: SwitchCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The merged experts' weights (E, out, in) and biases, values and dtypes, against peft's ``merge()``.

    The merged layer's outputs are a check of their own (`switch_merged_forward`): running a switch
    layer can fail where merging one does not (MLX's CPU ``gather_mm`` takes float32 only).
    """

    def expect() -> Expected:
        bias = Tracked.exact(case.stacked("bias"), case.dtype) if case.first.has_bias else None
        return {"merged weight": oracle.switch_merged_weight(case), "merged bias": bias}

    def reference() -> Observed:
        layer = peft_layers.switch(case)
        layer.merge()
        weight, bias = peft_layers.switch_merged_parameters(layer)
        observed = {"merged weight": _from_torch(weight)}
        if bias is not None:
            observed["merged bias"] = _from_torch(bias)
        return observed

    def run_subject() -> Observed:
        merged = subject.merge(subject.build(case))
        _evaluated(merged.parameters())
        observed = {"merged weight": _from_mlx(merged.weight)}
        if "bias" in merged:
            observed["merged bias"] = _from_mlx(merged["bias"])
        return observed

    return _run("merge", subject, case, timer, expect, reference, run_subject)


def switch_merged_forward(subject: Subject, case: SwitchCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The merged layer routes each token to its experts' merged weights, as peft's merged layer does."""

    def reference() -> Observed:
        layer = peft_layers.switch(case)
        layer.merge()
        return {"merged output": _from_torch(peft_layers.switch_forward(layer, case))}

    def run_subject() -> Observed:
        output = bridge.switch_call(subject.merge(subject.build(case)), case)
        _evaluated(output)
        return {"merged output": _from_mlx(output)}

    return _run(
        "merged_forward", subject, case, timer,
        expect=lambda: {"merged output": oracle.switch_merged_forward(case)},
        reference=reference,
        run_subject=run_subject,
    )


# Error parity -------------------------------------------------------------------------------


def _outcome(run: Callable[[], torch.Tensor | mx.array]) -> tuple[str, np.ndarray | None]:
    """What one side did with a bad configuration or input: what it raised, or what it computed."""
    try:
        output = run()
    except Exception as error:  # noqa: BLE001 - raising is the expected, good outcome here
        return f"raised {type(error).__name__}: {str(error).splitlines()[0][:160]}", None
    values = peft_layers.to_numpy(output) if isinstance(output, torch.Tensor) else bridge.to_numpy(output)
    finite = int(np.isfinite(values).sum())
    return f"computed an output of shape {values.shape} ({finite} of {values.size} elements finite)", values


def error_parity(
    subject: Subject,
    case: LinearCase | EmbeddingCase,
    scenario: str,
    subject_run: Callable[[], mx.array],
    reference_run: Callable[[], torch.Tensor],
) -> Measurement:
    """The subject and peft meet a bad configuration or input the same way.

    Where peft raises a clear error, a subject that silently computes something fails; a subject that
    raises where peft computes is stricter, which is recorded, not failed; where both compute (NaN or
    inf inputs), the non-finite elements must be the same ones.
    """
    measurement = Measurement(subject.name, "error_parity", {**case.describe(), "scenario": scenario})
    said, got = _outcome(subject_run)
    peft_said, want = _outcome(reference_run)
    measurement.hints.append(f"subject {said}; peft {peft_said}")
    if got is not None and want is None:
        problem = f"{said}, but peft {peft_said}"
        measurement.comparisons.append(failed(problem, scenario, "subject"))
    elif got is None:
        measurement.comparisons.append(Comparison(scenario, "subject"))
    elif got is not None and (got.shape != want.shape or np.any(np.isfinite(got) != np.isfinite(want))):
        problem = f"non-finite elements differ from peft's: subject {said}, peft {peft_said}"
        measurement.comparisons.append(failed(problem, scenario, "subject"))
    else:
        measurement.comparisons.append(Comparison(scenario, "subject"))
    return measurement


Check = Callable[[Subject, "LinearCase | EmbeddingCase", PhaseTimer], Measurement]
FAMILY_CHECKS: dict[str, dict[str, Check]] = {
    "linear": {
        "forward": forward,
        "merge": merge,
        "grad": grad,
        "grad_bias_all": grad_bias_all,
        "dropout": dropout,
        "dropout_scaling": dropout_scaling,
        "steps_sgd": steps_sgd,
        "steps_adamw": steps_adamw,
    },
    "dora_linear": {
        "forward": forward,
        "merge": merge,
        "grad": grad,
        "grad_bias_all": grad_bias_all,
        "dropout": dropout,
        "init": init,
        "init_with_adapter": init_with_adapter,
    },
    "embedding": {
        "forward": lookup,
        "as_linear": as_linear,
        "merge": embedding_merge,
        "grad": grad,
        "dropout": dropout,
        "steps_sgd": steps_sgd,
        "steps_adamw": steps_adamw,
    },
    "dora_embedding": {
        "forward": lookup,
        "as_linear": as_linear,
        "merge": embedding_merge,
        "init": init,
        "init_with_adapter": init_with_adapter,
    },
    "switch_linear": {
        "forward": switch_forward,
        "merge": switch_merge,
        "merged_forward": switch_merged_forward,
        "grad": switch_grad,
    },
}
"""Each family's checks by the name they are recorded under."""
QUANTIZED_CHECKS: dict[str, dict[str, Check]] = {
    "linear": {"forward": forward, "merge": merge, "requantize": requantize, "grad": grad},
    "dora_linear": {"forward": forward, "merge": merge, "requantize": requantize, "init": init, "grad": grad},
    "switch_linear": {**FAMILY_CHECKS["switch_linear"], "requantize": requantize},
    "embedding": {**FAMILY_CHECKS["embedding"], "requantize": requantize},
}
"""The checks of a family on a quantized base, where it has one."""


def find_check(family: str, name: str) -> Check | None:
    """The check `name` of a family, on a plain or a quantized base: what ``replay`` can re-run."""
    return FAMILY_CHECKS.get(family, {}).get(name) or QUANTIZED_CHECKS.get(family, {}).get(name)


def replayable(name: str) -> bool:
    return any(find_check(family, name) for family in FAMILY_CHECKS)
