"""The checks of whole models: the packages' own entry points on a tiny model against transformers and peft.

Each check runs the subject (`subjects.models`: mlx-lm's or mlx-vlm's entry points, or a wrong variant of them), the
reference (peft on the transformers model, in the case's dtype, in each order a correct implementation may take) and
the oracle (the same in float64) on one `ModelCase`, and judges the subject's logits (the adapters' movement and the
losses, for the steps) with the whole-model verdict (`foundation.model_verdict`). As the layer checks do, a check never
raises because of a side: what a side raises becomes a failing comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch

from conformance import adapters as adapter_files
from conformance.timing import UNTIMED, PhaseTimer
from foundation import memo
from foundation.model_cases import ModelCase
from foundation.model_files import (
    mlx_directory,
    mlx_lm_adapters,
    mlx_weights,
    new_directory,
    quantized_layers,
    requantized,
)
from foundation.model_verdict import MARGIN, compare_whole
from foundation.verdict import Comparison, Measurement, Tracked, compare, failed, raised
from reference import models as reference
from subjects import kernels
from subjects import models as subject_side
from subjects.known import Subject


def _side(produce: Callable[[], np.ndarray], quantity: str, side: str) -> tuple[np.ndarray | None, list[Comparison]]:
    """What a side produced, or the failing comparison of what it raised instead."""
    try:
        values = produce()
    except Exception as error:  # noqa: BLE001 - any exception of a side is a finding
        return None, [raised(error, quantity, side)]
    if not np.all(np.isfinite(values)):
        return None, [failed("has inf or NaN elements", quantity, side, "non-finite")]
    return values, []


def _logits_check(
    check: str,
    subject: Subject,
    case: ModelCase,
    timer: PhaseTimer,
    run_subject: Callable[[], np.ndarray],
    run_references: Callable[[], list[np.ndarray]],
    references_of: str | None = None,
) -> Measurement:
    """One check of logits: the subject's against the float64 model's, held to the reference's own error in each
    order a correct implementation may take (`run_references` gives the logits of each; those of check
    `references_of` where they are that check's), and to the float64 model's with every module's inputs and outputs
    perturbed by one rounding (`yardsticks`). Where the subject raised, the reference is not run: there is nothing for
    its error to judge."""
    measurement = Measurement(subject.name, check, case.describe())
    with timer("subject"):
        observed, problems = _side(run_subject, "logits", "subject")
        measurement.comparisons += problems
    if observed is None:
        return measurement
    with timer("oracle"):
        oracle = reference.oracle_logits(case)
    with timer("reference"):
        references, problems = memo.once(
            case,
            ("reference", references_of or check),
            lambda: _side(lambda: np.stack(run_references()), "logits", "reference"),
        )
        measurement.comparisons += problems
        if references is not None:
            references = yardsticks(case, list(references))
    if references is not None:
        largest = reference.oracle_largest(case)
        measurement.comparisons.append(compare_whole("logits", observed, references, oracle, case.dtype, largest))
        if not measurement.passed:
            measurement.hints += hints(subject, case, observed)
    return measurement


def yardsticks(case: ModelCase, references: list[np.ndarray]) -> list[np.ndarray]:
    """What a subject's logits are held to, by their error against the float64 model's: the reference's `references`
    and the float64 model perturbed by one rounding at every module (`reference.perturbed_logits`)."""
    return [*references, *reference.perturbed_logits(case)]


def logits(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The adapted model's logits in eval mode (mlx-lm's ``load_model`` and ``load_adapters``), against peft's
    ``get_peft_model`` on the transformers model."""
    return _logits_check(
        "logits",
        subject,
        case,
        timer,
        lambda: subject_side.logits(subject.convention.adapted(case), case),
        lambda: reference_orders(case),
    )


def reference_orders(case: ModelCase) -> list[np.ndarray]:
    """The adapted model's logits in each order a correct implementation may take: each LoRA term added in float32
    (peft) or rounded to the model's dtype first (mlx-lm), with each attention implementation; on a quantized model in
    half precision also MLX's own order, whose quantized layers sum their products in the dtype."""
    found = []
    for cast_first in (False, True):
        with reference.borrowed(case, case.dtype.torch, term_cast_first=cast_first) as model:
            found += reference.logits_in_each_attention(model, case)
    if reference.sums_quantized_in_dtype(case):
        found.append(reference.mlx_quantized_logits(case))
    return found


def adapters_in_peft(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The adapters the package saves (`adapter_directory`: its own save path), converted to peft's files by
    `conformance.adapters` and loaded by peft's ``PeftModel.from_pretrained``, give the logits of peft's adapted
    model: what the file means in the HuggingFace world."""

    def in_peft() -> np.ndarray:
        converted = new_directory("converted-to-peft-") / "adapters"
        adapter_files.write_peft(adapter_files.read_mlx(subject.convention.adapter_directory(case)), converted)
        return reference.logits(reference.with_saved_adapters(case, converted), case)

    return _logits_check(
        "adapters_in_peft", subject, case, timer, in_peft, lambda: reference_orders(case), references_of="logits"
    )


def adapters_from_peft(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """peft's adapters as its ``save_pretrained`` saves them, converted to the package's files by
    `conformance.adapters` and loaded by the package's own loader, give peft's logits."""

    def from_peft() -> np.ndarray:
        converted = new_directory("converted-from-peft-") / "adapters"
        read = adapter_files.read_peft(reference.saved_adapters(case))
        adapter_files.write_mlx(read, converted, subject.convention.adapter_schema, case.layers)
        return subject_side.logits(subject.convention.adapted(case, converted), case)

    return _logits_check(
        "adapters_from_peft", subject, case, timer, from_peft, lambda: reference_orders(case), references_of="logits"
    )


def converts(case: ModelCase) -> bool:
    """Whether `conformance.adapters` converts the case's adapters (a text model's: not yet a vision-language
    model's language part), in a model its dtype holds (`fits_dtype`)."""
    return not case.vision_language and fits_dtype(case)


def rope_parameters(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """`logits` of the same model saved as transformers 5 saves it: the rotary base only under ``rope_parameters``."""
    saved_by_transformers_5 = memo.once(case, "rope_parameters_only", lambda: replace(case, rope_parameters_only=True))
    measurement = logits(subject, saved_by_transformers_5, timer)
    measurement.check, measurement.case = "rope_parameters", case.describe()
    return measurement


def fuse(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The model mlx-lm's ``fuse`` saves (on a quantized base, ``fuse --dequantize``), loaded by mlx-lm, against
    peft's ``merge_and_unload()``."""
    return _logits_check(
        "fuse",
        subject,
        case,
        timer,
        lambda: subject_side.logits(subject.convention.fused(case, dequantize=case.quantization is not None), case),
        lambda: _merges(case),
    )


def fused_in_transformers(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The model mlx-lm's ``fuse`` saves, loaded by transformers' ``from_pretrained``, against peft's
    ``merge_and_unload()``: the file people take from MLX to the HuggingFace world. Weights transformers cannot map
    (which it initialises at random, with a warning only) fail the check before the logits."""
    measurement = Measurement(subject.name, "fused_in_transformers", case.describe())
    with timer("subject"):
        try:
            directory = subject.convention.fused_directory(case, dequantize=case.quantization is not None)
            model, problem = reference.loaded_and_problems(directory, case.dtype.torch)
        except Exception as error:  # noqa: BLE001 - any exception of a side is a finding
            measurement.comparisons.append(raised(error, "logits", "subject"))
            return measurement
    if problem is not None:
        measurement.comparisons.append(failed(problem, "weights", "subject", "absent"))
        return measurement
    return _logits_check(
        "fused_in_transformers", subject, case, timer, lambda: reference.logits(model, case), lambda: _merges(case)
    )


def requantize(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """mlx-lm's ``fuse`` without ``--dequantize`` keeps a quantized model quantized: each adapted layer is exactly MLX's
    quantization, in the base's mode, bits and group size, of the weight ``fuse --dequantize`` saves (judged against
    peft's merge by `fuse`), and every other quantized layer holds what it held. Its detail: how much of the adapters'
    contribution to the logits the re-quantized model keeps (small updates vanish in re-quantization: mlx-lm #1172)."""
    measurement = Measurement(subject.name, "requantize", case.describe())
    with timer("subject"):
        try:
            saved = subject.convention.fused_directory(case)
            fused = quantized_layers(mlx_weights(saved), case)
            dequantized = mlx_weights(subject.convention.fused_directory(case, dequantize=True))
            fused_logits = subject_side.logits(subject_side.loaded(saved), case)
        except Exception as error:  # noqa: BLE001 - any exception of a side is a finding
            measurement.comparisons.append(raised(error, "requantized weights", "subject"))
            return measurement
    with timer("reference"):
        base = quantized_layers(mlx_weights(mlx_directory(case)), case)
        expected = {
            layer: requantized(dequantized[f"{layer}.weight"], case) if layer in case.adapters else values
            for layer, values in base.items()
        }
    if set(fused) != set(expected):
        measurement.comparisons.append(
            _names("requantized weights", "absent", set(fused), set(expected), "layers quantized", "not", "quantized")
        )
        return measurement
    layers = sorted(expected)
    observed = np.concatenate([fused[layer].ravel() for layer in layers])
    want = Tracked.exact(np.concatenate([expected[layer].ravel() for layer in layers]), case.dtype)
    comparison = compare("requantized weights", "subject", observed, want)
    contribution = reference.oracle_logits(case) - reference.base_logits(case)
    norm = float(np.sum(np.square(contribution)))
    kept = float(np.sum((fused_logits - reference.base_logits(case)) * contribution)) / norm if norm else None
    comparison.detail = (
        "the adapters do not reach the logits"
        if kept is None
        else f"the re-quantized model keeps {kept:.1%} of the adapters' contribution to the logits"
    )
    measurement.comparisons.append(comparison)
    return measurement


def _merges(case: ModelCase) -> list[np.ndarray]:
    """The merged model's logits in each order a correct merge may take (`reference.merged`, and the update rounded
    first), with each attention implementation."""
    found = []
    for merge in (reference.merged, reference.merged_update_first):
        found += reference.logits_in_each_attention(merge(case, case.dtype.torch), case)
    return found


STEPS = 3
OPTIMIZERS = ("sgd", "adam")
"""The optimizers the steps take: SGD, and Adam (mlx-lm's default optimizer; torch's, with its bias correction)."""


def learning_rate(case: ModelCase, optimizer: str) -> float:
    """SGD's 0.05; Adam's a sixteenth of the range the adapters are drawn within, as each of its steps moves every
    entry by about the learning rate, whatever the gradient's size."""
    return 0.05 if optimizer == "sgd" else case.adapter_scale / 16


def steps_sgd(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """`STEPS` steps of SGD through mlx-lm's training path (its `default_loss`, MLX's SGD) move the adapters, and give
    the losses, that torch's SGD gives peft's adapted model; only the adapters train."""
    return _steps(subject, case, timer, "sgd")


def steps_adam(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """As `steps_sgd`, with Adam: MLX's, bias-corrected as mlx-lm's ``optimizer_config`` can ask, against torch's."""
    return _steps(subject, case, timer, "adam")


def _steps(subject: Subject, case: ModelCase, timer: PhaseTimer, optimizer: str) -> Measurement:
    measurement = Measurement(subject.name, f"steps_{optimizer}", case.describe())
    with timer("oracle"):
        oracle = _oracle_steps(case, optimizer)
    with timer("reference"):
        orders, problems = memo.once(
            case, ("reference", f"steps_{optimizer}"), lambda: _trained_references(case, optimizer)
        )
        measurement.comparisons += problems
    with timer("subject"):
        try:
            losses, trained = subject.convention.trained(case, STEPS, learning_rate(case, optimizer), optimizer)
        except Exception as error:  # noqa: BLE001 - any exception of a side is a finding
            measurement.comparisons.append(raised(error, "steps", "subject"))
            return measurement
    trainable = _names(
        "trainable parameters", "trainable", set(trained), set(oracle[1]), "parameters train", "frozen", "trained"
    )
    measurement.comparisons.append(trainable)
    if trainable.problem is None and orders is not None:

        def moved(parameters: dict[str, np.ndarray]) -> np.ndarray:
            return np.concatenate([(parameters[name] - start).ravel() for name, start in _initial(case).items()])

        # A loss carries the logits' errors, whose floor is one rounding of the largest value the model computes;
        # the adapters' movement is far smaller than those values, and is held to its own.
        model_largest = reference.oracle_largest(case)
        judged = (
            ("adapter steps", moved(trained), [moved(order[1]) for order in orders], moved(oracle[1]), 0.0),
            ("losses", np.array(losses), [np.array(o[0]) for o in orders], np.array(oracle[0]), model_largest),
        )
        for quantity, observed, references, expected, largest in judged:
            measurement.comparisons.append(compare_whole(quantity, observed, references, expected, case.dtype, largest))
        if not measurement.passed:
            measurement.hints.append(movement_hint(moved(trained), moved(oracle[1])))
    return measurement


def movement_hint(observed: np.ndarray, expected: np.ndarray) -> str:
    """How far the subject's steps moved the adapters, along the float64 model's movement: a step size's error (a
    learning rate, an optimizer's bias correction) is a factor."""
    ratio = float(observed @ expected) / float(expected @ expected) if np.any(expected) else float("nan")
    return f"the adapters' movement is {ratio:.7f}x the float64 model's"


def _oracle_steps(case: ModelCase, optimizer: str) -> tuple[list[float], dict[str, np.ndarray], list[np.ndarray]]:
    """The float64 model's steps: losses, trained parameters, and its routers' logits on the way."""

    def steps() -> tuple[list[float], dict[str, np.ndarray], list[np.ndarray]]:
        routes: list[np.ndarray] = []
        rate = learning_rate(case, optimizer)
        return (*reference.trained(case, torch.float64, STEPS, rate, routes=routes, optimizer=optimizer), routes)

    return memo.once(case, ("trained", optimizer), steps)


def _initial(case: ModelCase) -> dict[str, np.ndarray]:
    """The adapters before the steps, by mlx-lm's names and layouts."""
    return {name: values.astype(np.float64) for name, values in sorted(mlx_lm_adapters(case)[0].items())}


def _trained_references(case: ModelCase, optimizer: str) -> tuple[list | None, list[Comparison]]:
    """peft's steps in each order a correct implementation may take: the LoRA term added in float32 or rounded first,
    either attention, the loss from float32 logits or from the model's dtype (on a quantized model in half precision,
    also MLX's own order, whose quantized layers sum their products in the dtype); and the float64 model's with every
    forward pass perturbed by one rounding at every module."""
    rate = learning_rate(case, optimizer)
    try:
        orders = [
            reference.trained(case, case.dtype.torch, STEPS, rate, cast_first, attention, in_dtype, optimizer=optimizer)
            for cast_first in (False, True)
            for attention in reference.ATTENTION
            for in_dtype in reference.loss_orders(case)
        ]
        if reference.sums_quantized_in_dtype(case):  # MLX's own order, the quantized layers' sums in the dtype
            orders.append(
                reference.trained(
                    case,
                    case.dtype.torch,
                    STEPS,
                    rate,
                    term_cast_first=True,
                    attention="eager",
                    loss_in_dtype=True,
                    optimizer=optimizer,
                    quantized_in_dtype=True,
                )
            )
        orders += [  # what rounding in the forward passes moves, as `reference.perturbed_logits` for the logits
            reference.trained(
                case, torch.float64, STEPS, rate, perturbed=(case.dtype.unit_roundoff, seed), optimizer=optimizer
            )
            for seed in range(case.seed, case.seed + reference.PERTURBATIONS)
        ]
    except Exception as error:  # noqa: BLE001 - any exception of a side is a finding
        return None, [raised(error, "steps", "reference")]
    return orders, []


HEADROOM = 16.0
"""How far below the dtype's largest number the float64 model's values must stay for a case to be judged."""


def fits_dtype(case: ModelCase) -> bool:
    """Whether the model's values (every module's inputs and outputs, in float64) stay `HEADROOM` times below the
    largest number of the case's dtype, and a mixture's routers choose as every rounding would (`routing_holds`): a
    tiny float16 model with large adapters overflows in any implementation, peft's too, and there is nothing to
    judge (as the layer families do not draw such cases). A mixture is drawn only in a dtype MLX's ``gather_mm``
    takes on the device: on the CPU, float32 (the switch layers' known divergence shows the rest)."""
    if case.mixture and not kernels.gather_mm_runs_in(case.dtype):
        return False
    if reference.oracle_largest(case) * HEADROOM >= case.dtype.largest:
        return False
    return not case.mixture or routing_holds(case, reference.oracle_routes(case), _rounded_routes(case))


def trainable_steps(case: ModelCase, optimizer: str = "sgd") -> bool:
    """Whether the case has a next token to predict, in a model its dtype holds, whose routers choose as every
    rounding would in every step of `optimizer`."""
    if case.length < 2 or not fits_dtype(case):
        return False
    if not case.mixture:
        return True
    return routing_holds(case, _oracle_steps(case, optimizer)[2], [_rounded_steps_routes(case, optimizer)])


def trainable_adam_steps(case: ModelCase) -> bool:
    """`trainable_steps` with Adam."""
    return trainable_steps(case, "adam")


def routing_holds(case: ModelCase, oracle: list[np.ndarray], rounded: list[list[np.ndarray]]) -> bool:
    """Whether the routers' choices in the float64 model are choices no rounding changes: for every token, the gap
    between the logit of the last expert chosen and the next exceeds ``2 MARGIN (d + u)``, d the largest distance of
    a rounded order's router logits from the float64 model's (`rounded`: the reference in the case's dtype) and u
    the dtype's unit roundoff (MLX chooses from probabilities rounded to the dtype). A subject is allowed `MARGIN`
    times the reference's error; a token one rounding routes elsewhere is nothing to judge, in any implementation."""
    chosen = case.experts_per_token
    if chosen >= case.experts:
        return True
    d = max(float(np.max(np.abs(r - o))) for order in rounded for r, o in zip(order, oracle, strict=True))
    allowed = 2 * MARGIN * (d + case.dtype.unit_roundoff)
    for logits_of_router in oracle:
        ranked = -np.sort(-logits_of_router, axis=-1)
        if np.min(ranked[:, chosen - 1] - ranked[:, chosen]) <= allowed:
            return False
    return True


def _rounded_routes(case: ModelCase) -> list[list[np.ndarray]]:
    """The routers' logits of the reference in the case's dtype: adapted, and merged with the update rounded
    first."""

    def routes() -> list[list[np.ndarray]]:
        with reference.borrowed(case, case.dtype.torch) as adapted:
            found = [_routes_of(adapted, case)]
        return [*found, _routes_of(reference.merged_update_first(case, case.dtype.torch), case)]

    return memo.once(case, "rounded routes", routes)


def _routes_of(model: torch.nn.Module, case: ModelCase) -> list[np.ndarray]:
    with reference.recorded_routes(model) as routed:
        reference.logits(model, case)
    return routed


def _rounded_steps_routes(case: ModelCase, optimizer: str) -> list[np.ndarray]:
    """The routers' logits of peft's steps of `optimizer` in the case's dtype."""

    def routes() -> list[np.ndarray]:
        routed: list[np.ndarray] = []
        rate = learning_rate(case, optimizer)
        reference.trained(case, case.dtype.torch, STEPS, rate, routes=routed, optimizer=optimizer)
        return routed

    return memo.once(case, ("rounded steps routes", optimizer), routes)


def adapted_modules(subject: Subject, case: ModelCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The modules mlx-lm adapts for the configuration are those peft adapts for the bridged one."""
    measurement = Measurement(subject.name, "adapted_modules", case.describe())
    with timer("reference"):
        expected = memo.once(case, ("reference", "adapted_modules"), lambda: _modules_of_reference(case))
    with timer("subject"):
        try:
            found = subject_side.adapted_modules(subject.convention.adapted(case))
        except Exception as error:  # noqa: BLE001 - any exception of a side is a finding
            measurement.comparisons.append(raised(error, "adapted modules", "subject"))
            return measurement
    measurement.comparisons.append(
        _names("adapted modules", "modules", found, expected, "modules adapted", "not adapted", "adapted")
    )
    return measurement


def _names(quantity: str, kind: str, found: set[str], expected: set[str], counted: str, absent: str, extra: str):
    """The subject's set of names (of adapted modules, of trainable parameters) against peft's: a failing comparison
    of kind `kind` that lists the names only one side has, where they differ."""
    comparison = Comparison(quantity, "subject", kind=kind, detail=f"{len(found)} {counted}")
    if found != expected:
        only_peft, only_subject = sorted(expected - found), sorted(found - expected)
        comparison.problem = (
            f"{len(found)} {counted}, but should be peft's {len(expected)}"
            + (f"; {absent} in the subject: {', '.join(only_peft)}" if only_peft else "")
            + (f"; {extra} only by the subject: {', '.join(only_subject)}" if only_subject else "")
        )
        comparison.margin = float("inf")
    return comparison


def _modules_of_reference(case: ModelCase) -> set[str]:
    with reference.borrowed(case, case.dtype.torch) as model:
        return reference.adapted_modules(model, case)


def hints(subject: Subject, case: ModelCase, observed: np.ndarray) -> list[str]:
    """What a failure of the logits looks like: how large the adapters' contribution is against the float64 model's,
    and where the subject's model was built with another rotary base than the configuration's."""
    found = []
    contribution = reference.oracle_logits(case) - reference.base_logits(case)
    norm = float(np.sum(np.square(contribution)))
    if norm > 0:
        ratio = float(np.sum((observed - reference.base_logits(case)) * contribution)) / norm
        found.append(f"the adapters' contribution to the logits is {ratio:.4f}x the float64 model's")
    built = rotary_base(subject, case)
    if built is not None and built != case.rope_theta:
        found.append(
            f"{subject.distribution} built the model with rope_theta {built:g}, but config.json says "
            f"{case.rope_theta:g}"
            + (" (under rope_parameters, as transformers 5 saves it)" if case.rope_parameters_only else "")
        )
    return found


def rotary_base(subject: Subject, case: ModelCase) -> float | None:
    """The rotary base the subject's model was built with, where its arguments say."""
    try:
        return subject.convention.rotary_base(case)
    except Exception:  # noqa: BLE001 - a hint only
        return None
