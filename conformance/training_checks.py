"""The checks of training: gradients, dropout in training mode, and optimizer steps.

They share the harness of `checks` (each side run, each quantity held to the oracle) and, like those,
never raise because of the subject or the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import mlx.core as mx
import numpy as np

from conformance import diagnosis, dropout_statistics
from conformance.checks import Expected, Observed, from_mlx, from_torch, measure
from conformance.timing import UNTIMED, PhaseTimer
from foundation import memo, optimizers
from foundation.cases import EmbeddingCase, LinearCase, dropout_mask, fits_dtype, gradients_fit, upstream_gradient
from foundation.switch_cases import SwitchCase, switch_upstream_gradient
from foundation.verdict import Measurement, compare, failed, raised
from reference import oracle, peft_layers, trajectory
from subjects import bridge
from subjects.known import Subject

# Gradients ---------------------------------------------------------------------------------------


def _gradients(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer, bias_trains: bool) -> Measurement:
    embedding = isinstance(case, EmbeddingCase)
    upstream = upstream_gradient(case.lookup if embedding else case)
    trained: dict[str, set[str]] = {}

    def expect(case: LinearCase | EmbeddingCase) -> Expected:
        return oracle.embedding_grads(case, upstream) if embedding else oracle.linear_grads(case, upstream, bias_trains)

    def peft_grads() -> tuple[dict, set[str]]:  # the reference's judgment and its trainable roles read it
        return memo.once(case, ("peft grads", bias_trains), lambda: peft_layers.grads(case, upstream, bias_trains))

    # DoRA's magnitude gradient has the magnitude's dtype: float32 in MLX, the layer's in peft.
    def reference() -> Observed:
        found, _ = peft_grads()
        return {name: from_torch(values, judge_dtype=name != "grad m") for name, values in found.items()}

    def run_subject() -> Observed:
        found, trained["subject"] = bridge.grads(
            subject.build(case), subject.convention.roles, case, upstream, bias_trains
        )
        return from_mlx(found, unjudged_dtypes=("grad m",))

    check = "grad_bias_all" if bias_trains else "grad"
    diagnose = None if embedding else lambda measurement, observed: diagnosis.norm_hints(case)
    measurement = measure(check, subject, case, timer, expect, reference, run_subject, diagnose)
    _compare_trainable(measurement, trained, peft_grads)
    return measurement


def _compare_trainable(
    measurement: Measurement, trained: dict[str, set[str]], peft_grads: Callable[[], tuple[dict, set[str]]]
) -> None:
    """A failing comparison where the subject trains other parameters (by role) than peft (where peft's layer
    trained at all: if it raised, its judgment says so)."""
    if "subject" not in trained:
        return
    try:
        reference = peft_grads()[1]
    except Exception:  # noqa: BLE001 - the reference's judgment has recorded it
        reference = set()
    if trained["subject"] == reference:
        return
    problem = f"trains {sorted(trained['subject'])}, but should train {sorted(reference)} as peft does"
    measurement.comparisons.append(failed(problem, "trainable parameters", "subject", "trainable parameters"))
    measurement.hints.append(
        f"trainable only in the subject: {sorted(trained['subject'] - reference)}; "
        f"only in peft: {sorted(reference - trained['subject'])}"
    )


def grad(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """Gradients of ``sum(y * T)`` (T fixed and random) for every adapter parameter (A, B, DoRA's m) and
    the input, in eval mode, against torch autograd through peft's layer and the float64 formulas; and
    the same set of trainable parameters as peft's (base frozen, ``bias="none"``)."""
    return _gradients(subject, case, timer, bias_trains=False)


def grad_bias_all(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """As `grad`, with peft's ``bias="all"``: the base's bias trains too (MLX: unfrozen), ``db = sum_rows(T)``."""
    return _gradients(subject, case, timer, bias_trains=True)


def switch_grad(subject: Subject, case: SwitchCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """Gradients of ``sum(y * T)`` for every expert's A and B and for x, against torch autograd through
    peft's switch reference and the float64 formulas; and the same trainable parameters (base frozen)."""
    upstream = switch_upstream_gradient(case)
    trained: dict[str, set[str]] = {}

    def peft_grads() -> tuple[dict, set[str]]:
        return memo.once(case, "peft grads", lambda: peft_layers.switch_grads(case, upstream))

    def reference() -> Observed:
        return {name: from_torch(values) for name, values in peft_grads()[0].items()}

    def run_subject() -> Observed:
        found, trained["subject"] = bridge.switch_grads(subject.build(case), subject.convention.roles, case, upstream)
        return from_mlx(found)

    measurement = measure(
        "grad", subject, case, timer, lambda case: oracle.switch_grads(case, upstream), reference, run_subject
    )
    _compare_trainable(measurement, trained, peft_grads)
    return measurement


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

    def expect(case: LinearCase | EmbeddingCase) -> Expected:
        if embedding:
            return {"output": oracle.embedding_forward(case)}
        return {"output": oracle.linear_forward(case, oracle.dropped_input(case, mask(case.x.shape)))}

    def reference() -> Observed:
        if embedding:
            layer = peft_layers.trained_with_mask(peft_layers.embedding(case), mask, view.dropout)
            return {"output": from_torch(peft_layers.lookup(layer, case))}
        layer = peft_layers.trained_with_mask(peft_layers.linear(case), mask, case.dropout)
        return {"output": from_torch(peft_layers.forward(layer, case))}

    def run_subject() -> Observed:
        layer = subject.build(case)
        if bridge.inject_dropout(layer, view.dropout, mask) == 0:
            raise LookupError("the layer has no mlx.nn.Dropout inside to give the mask to")
        layer.train()
        return from_mlx({"output": layer(mx.array(case.ids) if embedding else bridge.mlx_array(case.x, case.dtype))})

    def diagnose(measurement: Measurement, observed: Observed) -> list[str]:
        if "output" not in observed:
            return []
        return diagnosis.dropout_hints(view, observed["output"][0], mask)

    return measure("dropout", subject, case, timer, expect, reference, run_subject, diagnose)


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
            mx.random.seed(case.seed)  # the masks, and so the verdict, are the case's: replayable
            training = layer(mx.broadcast_to(x, (dropout_statistics.SAMPLES, *x.shape)))
            mx.eval(evaluation, training)
        except Exception as error:  # noqa: BLE001 - any exception of the subject is a finding
            measurement.comparisons.append(raised(error, "dropout_scaling", "subject"))
            return measurement
    with timer("oracle"):
        premise = compare("eval output", "subject", bridge.to_numpy(evaluation), oracle.linear_forward(case))
        if not premise.passed:  # the statistic's variance is the formula's; a wrong LoRA term breaks it
            problem = (
                "cannot be judged: the eval output disagrees with the formula (the forward check says how): "
                + premise.describe()
            )
            measurement.comparisons.append(failed(problem, "dropout_scaling", "subject", "premise"))
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
        return {
            f"{role} after step {k}": convert(values)
            for k, adapter in enumerate(adapters, 1)
            for role, values in adapter.items()
        }

    def expect(case: LinearCase | EmbeddingCase) -> Expected:
        view = case.lookup if isinstance(case, EmbeddingCase) else case
        return by_step(trajectory.steps(view, spec, target, optimizers.STEPS), lambda tracked: tracked)

    def reference() -> Observed:
        return by_step(peft_layers.training_steps(case, spec, target, optimizers.STEPS), from_torch)

    def run_subject() -> Observed:
        adapters = bridge.training_steps(
            subject.build(case), subject.convention.roles, case, spec, target, optimizers.STEPS
        )
        return from_mlx(by_step(adapters, lambda values: values))

    # Three steps in half precision allow so much that a scale error under AdamW (which normalises the gradient)
    # fits in them as well as a precision loss does (mlx-vlm 0.4.4's raw alpha did): no precision hint.
    measurement = measure(f"steps_{kind}", subject, case, timer, expect, reference, run_subject, precision_hints=False)
    measurement.case.update(spec.describe())
    return measurement


def steps_fit(case: LinearCase | EmbeddingCase, kind: str) -> bool:
    """Whether the steps' float64 trajectory keeps gradients (AdamW: their squares) and the adapter far from
    overflow in the adapter's dtype (which holds them and the optimizer's state), and every step's forward and
    backward pass fits the case dtype as `fits_dtype` and `gradients_fit` ask of one pass: huge weights make the
    regression residual, and so every later step, overflow where no implementation could follow."""
    view = case.lookup if isinstance(case, EmbeddingCase) else case
    target = optimizers.regression_target(view)
    spec = optimizers.optimizer_for(view, kind, trajectory.first_gradients(view, target))
    largest: list[float] = []
    after = trajectory.steps(view, spec, target, optimizers.STEPS, largest)
    if not all(math.isfinite(value) and value < view.adapter_dtype.largest / 64 for value in largest):
        return False
    starts = [view, *(replace(view, lora_A=adapter["A"].value, lora_B=adapter["B"].value) for adapter in after[:-1])]
    return all(
        fits_dtype(start) and gradients_fit(start, oracle.linear_forward(start).value - target) for start in starts
    )


def steps_sgd(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """A and B after each of a few SGD steps on a fixed regression problem, against torch's SGD on peft's
    layer and the float64 steps, within the error rounding accumulates over the steps."""
    return _steps(subject, case, timer, "sgd")


def steps_adamw(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """As `steps_sgd`, with AdamW (bias-corrected on both sides, decoupled weight decay)."""
    return _steps(subject, case, timer, "adamw")
