"""The checks: each runs one property on the subject, the reference and the oracle for one case.

A check never raises because of the subject or the reference: an exception, a wrong shape or a
wrong dtype becomes a failing comparison that says what happened, so one broken subject cannot stop
the run. The caller records the `Measurement` and then asserts it. The checks of training
(gradients, dropout, optimizer steps) are in `training_checks`; which checks each family has, in
`families`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import mlx.core as mx
import numpy as np
import torch

from conformance import diagnosis
from conformance.timing import UNTIMED, PhaseTimer
from foundation import memo, quantization, systematic, weights
from foundation.cases import EmbeddingCase, LinearCase
from foundation.quantization import Quantization
from foundation.switch_cases import Case, SwitchCase
from foundation.verdict import Comparison, Measurement, Tracked, compare, compare_dtype, failed, raised
from reference import oracle, peft_layers
from subjects import bridge
from subjects.known import Subject

Observed = dict[str, tuple[np.ndarray, "str | None"]]
"""quantity -> (values as float64, dtype name or None where the dtype is not judged), as one side produced them."""
Expected = dict[str, "Tracked | None"]
"""quantity -> the oracle's value and bound, or None where the quantity must be absent."""
Judged = tuple[list[Comparison], Observed]
"""One side's comparisons with the oracle, and what it produced."""


def from_mlx(arrays: dict[str, mx.array], unjudged_dtypes: tuple[str, ...] = ()) -> Observed:
    """What the subject produced, evaluated at once: each quantity's values and (but in `unjudged_dtypes`) dtype."""
    values = bridge.all_to_numpy(arrays)
    return {
        name: (values[name], None if name in unjudged_dtypes else bridge.dtype_name(array))
        for name, array in arrays.items()
    }


def from_torch(values: torch.Tensor, judge_dtype: bool = True) -> tuple[np.ndarray, str | None]:
    return peft_layers.to_numpy(values), peft_layers.dtype_name(values) if judge_dtype else None


def _judge(check: str, side: str, produce: Callable[[], Observed], expected: Expected) -> Judged:
    """Run one side, then compare each quantity it should produce with the oracle."""
    comparisons: list[Comparison] = []
    try:
        observed = produce()
    except Exception as error:  # noqa: BLE001 - any exception of a side is a finding
        return [raised(error, check, side)], {}
    for quantity, want in expected.items():
        got = observed.get(quantity)
        if want is None and got is not None:
            comparisons.append(failed("is present, but should be absent", quantity, side, "present"))
        elif want is not None and got is None:
            comparisons.append(failed("is absent, but should be present", quantity, side, "absent"))
        elif want is not None:
            if got[1] is not None:
                comparisons.append(compare_dtype(quantity, side, got[1], want))
            comparisons.append(compare(quantity, side, got[0], want))
    return comparisons, observed


def measure(
    check: str,
    subject: Subject,
    case: Case,
    timer: PhaseTimer,
    expect: Callable[[Case], Expected],
    reference: Callable[[], Observed],
    run_subject: Callable[[], Observed],
    diagnose: Callable[[Measurement, Observed], list[str]] | None = None,
    expect_subject: Callable[[Case], Expected] | None = None,
    precision_hints: bool = True,
) -> Measurement:
    """One check of one case: each side's results against the oracle's for the case (`expect_subject`'s for the
    subject, where its convention defines the layer otherwise than peft), and a diagnosis where it failed.

    `expect` and `reference` depend on the case alone: the oracle's expectation and the reference's judgment are
    made once per case and check, and every subject checked on that case shares them (`foundation.memo`). The
    diagnosis may ask `expect` of a case close to this one (`diagnosis.precision_hints`, unless `precision_hints` is
    False: where the half-precision expectation's bound is too wide to tell a precision loss from another error)."""
    measurement = Measurement(subject.name, check, case.describe())
    with timer("oracle"):
        expected = memo.once(case, ("expected", check), lambda: expect(case))
        subject_expect = expect if expect_subject is None else expect_subject
        subject_expected = expected if expect_subject is None else expect_subject(case)
    with timer("reference"):
        judged = memo.once(case, ("reference", check), lambda: _judge(check, "reference", reference, expected))
        measurement.comparisons += judged[0]
    with timer("subject"):
        comparisons, observed = _judge(check, "subject", run_subject, subject_expected)
        measurement.comparisons += comparisons
    if measurement.passed:
        with timer("systematic"):
            for quantity, want in subject_expected.items():
                if want is not None and want.terms and quantity in observed:
                    measurement.components += systematic.components(quantity, observed[quantity][0], want)
    else:
        if diagnose is not None:
            measurement.hints += diagnose(measurement, observed)
        if not measurement.hints:  # costly: made for a failure no known divergence explains
            measurement.costly_hints = lambda: diagnosis.scale_hints(case, measurement, observed, subject_expect)
        if precision_hints:
            measurement.hints += diagnosis.precision_hints(case, measurement, observed, subject_expect)
            measurement.hints += diagnosis.precision_hints(case, measurement, judged[1], expect, side="reference")
    return measurement


# Linear base ---------------------------------------------------------------------------------


def forward(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's output in eval mode, against peft's and the oracle's."""

    def run_subject() -> Observed:
        return from_mlx({"output": subject.run(case).layer()(bridge.input_of(case))})

    def diagnose(measurement: Measurement, observed: Observed) -> list[str]:
        if "output" in observed:
            return diagnosis.forward_hints(case, observed["output"][0])
        return diagnosis.adapter_width_hints(case, [c.problem for c in measurement.comparisons if c.problem])

    return measure(
        "forward",
        subject,
        case,
        timer,
        expect=lambda case: {"output": oracle.linear_forward(case)},
        reference=lambda: {"output": from_torch(peft_layers.forward(peft_layers.run(case).layer(), case))},
        run_subject=run_subject,
        diagnose=diagnose,
    )


def merge(subject: Subject, case: LinearCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's merged layer (weight, bias, output) against peft's ``merge()`` and the oracle."""

    def expect(case: LinearCase) -> Expected:
        return {
            "merged weight": oracle.merged_weight(case),
            "merged bias": Tracked.exact(case.bias, case.dtype) if case.has_bias else None,
            "merged output": oracle.merged_forward(case),
        }

    def reference() -> Observed:
        layer = peft_layers.run(case).merged()
        base = layer.get_base_layer()
        weight = peft_layers.base_weight(layer, case)
        observed = {"merged weight": from_torch(weight), "merged output": from_torch(peft_layers.forward(layer, case))}
        if base.bias is not None and (case.has_bias or not case.fan_in_fan_out):
            observed["merged bias"] = from_torch(base.bias)
        return observed

    def run_subject() -> Observed:
        merged = subject.run(case).merged()
        produced = {"merged weight": merged.weight, "merged output": merged(bridge.input_of(case))}
        if "bias" in merged:
            produced["merged bias"] = merged["bias"]
        return from_mlx(produced)

    def diagnose(measurement: Measurement, observed: Observed) -> list[str]:
        if _failed(measurement, "merged weight") and "merged weight" in observed:
            return diagnosis.merge_hints(case, observed["merged weight"][0])
        return []

    return measure("merge", subject, case, timer, expect, reference, run_subject, diagnose)


def _failed(measurement: Measurement, quantity: str) -> bool:
    return any(c.side == "subject" and c.quantity == quantity and not c.passed for c in measurement.comparisons)


def requantize(
    subject: Subject, case: LinearCase | EmbeddingCase | SwitchCase, timer: PhaseTimer = UNTIMED
) -> Measurement:
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
                raise TypeError(
                    f"fuse(dequantize=False) returned a {type(requantized).__name__}, not a quantized layer"
                )
            settings = Quantization(requantized.mode, requantized.bits, requantized.group_size)
            biases = () if requantized.get("biases") is None else (requantized.biases,)
            dtype = getattr(mx, case.dtype.name)
            observed = quantization.dequantize((requantized.weight, requantized.scales, *biases), settings, dtype)
            expected = quantization.dequantize(quantization.quantize(dequantized, q), q, dtype)
            mx.eval(observed, expected)
            # An affine re-quantization keeps its scales in a floating dtype: the base's, as peft keeps it.
            scales_dtype = bridge.dtype_name(requantized.scales) if q.mode == "affine" else case.dtype.name
        except Exception as error:  # noqa: BLE001 - any exception of the subject is a finding
            measurement.comparisons.append(raised(error, "requantize", "subject"))
            return measurement
    if settings != q:
        problem = f"re-quantized as {settings}, but should be {q}"
        measurement.comparisons.append(failed(problem, "requantized weight", "subject", "settings"))
        return measurement
    want = Tracked.exact(bridge.to_numpy(expected), case.dtype)
    measurement.comparisons.append(compare_dtype("requantized scales", "subject", scales_dtype, want))
    measurement.comparisons.append(compare("requantized weight", "subject", bridge.to_numpy(observed), want))
    return measurement


# DoRA's magnitude -----------------------------------------------------------------------------


def _magnitude_at_creation(
    subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer, with_adapter: bool
) -> Measurement:
    def norms(view_of: Callable[[Case], LinearCase]) -> Callable[[Case], Expected]:
        def expect(case: Case) -> Expected:
            view = view_of(case)
            norm = weights.adapted_sum(view).row_norm() if with_adapter else oracle.magnitude_at_init(view)
            return {"magnitude": norm}

        return expect

    # Values only: MLX keeps m in float32 where peft keeps the layer's dtype; both are exact enough.
    def reference() -> Observed:
        return {"magnitude": from_torch(peft_layers.dora_magnitude_at_creation(case, with_adapter), judge_dtype=False)}

    def run_subject() -> Observed:
        magnitude = subject.magnitude_at_creation(case, with_adapter)
        return from_mlx({"magnitude": magnitude}, unjudged_dtypes=("magnitude",))

    check = "init_with_adapter" if with_adapter else "init"
    if not isinstance(case, EmbeddingCase):
        return measure(check, subject, case, timer, norms(lambda case: case), reference, run_subject)
    # No norm hint: the magnitude at creation is the table's norm, not the adapted one the hint is about.
    lookup, per_row = norms(lambda case: case.lookup), norms(lambda case: case.per_row)
    return _embedding_measure(check, subject, case, timer, lookup, reference, run_subject, per_row, norm_hints=False)


def init(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """DoRA's magnitude as derived when the layer is created on a base (B zero): the base's norms."""
    return _magnitude_at_creation(subject, case, timer, with_adapter=False)


def init_with_adapter(subject: Subject, case: LinearCase | EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """DoRA's magnitude as derived with a non-zero B already in place: the adapted weight's norms."""
    return _magnitude_at_creation(subject, case, timer, with_adapter=True)


# Embedding base -------------------------------------------------------------------------------


def _per_row(subject: Subject) -> bool:
    """Whether the subject's DoRA embedding keeps one magnitude per vocabulary row (MLX's), not per dimension
    (peft's)."""
    return getattr(subject.convention, "magnitude_per", "dimension") == "vocabulary row"


def _embedding_measure(
    check: str,
    subject: Subject,
    case: EmbeddingCase,
    timer: PhaseTimer,
    expect: Callable[[EmbeddingCase], Expected],
    reference: Callable[[], Observed],
    run_subject: Callable[[], Observed],
    expect_per_row: Callable[[EmbeddingCase], Expected],
    norm_hints: bool = True,
) -> Measurement:
    """`measure` for an embedding check. A DoRA embedding that keeps one magnitude per vocabulary row (MLX's) is
    judged against its own definition, `expect_per_row` (`EmbeddingCase.per_row`), with the half-precision norm's
    diagnosis, and the one difference from peft's definition is stated as a comparison of its own."""
    if not (case.lookup.use_dora and _per_row(subject)):
        return measure(check, subject, case, timer, expect, reference, run_subject)
    diagnose = (lambda measurement, observed: diagnosis.norm_hints(case.per_row)) if norm_hints else None
    measurement = measure(check, subject, case, timer, expect, reference, run_subject, diagnose, expect_per_row)
    vocabulary, dims = case.lookup.in_features, case.lookup.out_features
    problem = (
        f"is kept per vocabulary row ({vocabulary},), each token's vector normalised; peft keeps it per "
        f"embedding dimension ({dims},), each dimension normalised over the vocabulary"
    )
    measurement.comparisons.append(failed(problem, "magnitude", "subject", "convention"))
    return measurement


def lookup(subject: Subject, case: EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's embeddings of the case's token ids, against peft's and the oracle's."""

    def run_subject() -> Observed:
        return from_mlx({"output": subject.run(case).layer()(mx.array(case.ids))})

    return _embedding_measure(
        "forward",
        subject,
        case,
        timer,
        expect=lambda case: {"output": oracle.embedding_forward(case)},
        reference=lambda: {"output": from_torch(peft_layers.lookup(peft_layers.run(case).layer(), case))},
        run_subject=run_subject,
        expect_per_row=lambda case: {"output": oracle.embedding_rows_forward(case)},
    )


def as_linear(subject: Subject, case: EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """``as_linear`` (the tied output head) against ``hidden @ merged table^T`` from peft's merge."""

    def reference() -> Observed:
        table = peft_layers.run(case).merged().get_base_layer().weight
        with torch.no_grad():
            return {"output": from_torch(peft_layers.tensor(case.hidden, case.dtype) @ table.T)}

    def run_subject() -> Observed:
        return from_mlx({"output": subject.run(case).layer().as_linear(bridge.mlx_array(case.hidden, case.dtype))})

    return _embedding_measure(
        "as_linear",
        subject,
        case,
        timer,
        lambda case: {"output": oracle.embedding_as_linear(case)},
        reference,
        run_subject,
        expect_per_row=lambda case: {"output": oracle.embedding_rows_as_linear(case)},
    )


def embedding_merge(subject: Subject, case: EmbeddingCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The subject's merged table and its lookups against peft's ``merge()`` and the oracle."""

    def expect(table: Tracked) -> Expected:
        return {"merged weight": table, "merged output": table[case.ids]}

    def reference() -> Observed:
        layer = peft_layers.run(case).merged()
        return {
            "merged weight": from_torch(layer.get_base_layer().weight),
            "merged output": from_torch(peft_layers.lookup(layer, case)),
        }

    def run_subject() -> Observed:
        merged = subject.run(case).merged()
        return from_mlx({"merged weight": merged.weight, "merged output": merged(mx.array(case.ids))})

    return _embedding_measure(
        "merge",
        subject,
        case,
        timer,
        lambda case: expect(oracle.embedding_merged_weight(case)),
        reference,
        run_subject,
        expect_per_row=lambda case: expect(oracle.embedding_rows_merged_weight(case)),
    )


# Mixture-of-experts base ----------------------------------------------------------------------


def switch_forward(subject: Subject, case: SwitchCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """Each token's outputs from its k experts, against peft's and the oracle's.

    peft's reference is its LoRA on the experts' weight parameter (``target_parameters``), or one peft
    ``Linear`` per expert where peft refuses that (dropout > 0): see `peft_layers.switch`.
    """

    def run_subject() -> Observed:
        return from_mlx({"output": bridge.switch_call(subject.run(case).layer(), case)})

    return measure(
        "forward",
        subject,
        case,
        timer,
        expect=lambda case: {"output": oracle.switch_forward(case)},
        reference=lambda: {"output": from_torch(peft_layers.switch_forward(peft_layers.run(case).layer(), case))},
        run_subject=run_subject,
    )


def switch_merge(subject: Subject, case: SwitchCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The merged experts' weights (E, out, in) and biases, values and dtypes, against peft's ``merge()``.

    The merged layer's outputs are a check of their own (`switch_merged_forward`): running a switch
    layer can fail where merging one does not (MLX's CPU ``gather_mm`` takes float32 only).
    """

    def expect(case: SwitchCase) -> Expected:
        bias = Tracked.exact(case.stacked("bias"), case.dtype) if case.first.has_bias else None
        return {"merged weight": oracle.switch_merged_weight(case), "merged bias": bias}

    def reference() -> Observed:
        weight, bias = peft_layers.switch_merged_parameters(peft_layers.run(case).merged())
        observed = {"merged weight": from_torch(weight)}
        if bias is not None:
            observed["merged bias"] = from_torch(bias)
        return observed

    def run_subject() -> Observed:
        merged = subject.run(case).merged()
        produced = {"merged weight": merged.weight}
        if "bias" in merged:
            produced["merged bias"] = merged["bias"]
        return from_mlx(produced)

    return measure("merge", subject, case, timer, expect, reference, run_subject)


def switch_merged_forward(subject: Subject, case: SwitchCase, timer: PhaseTimer = UNTIMED) -> Measurement:
    """The merged layer routes each token to its experts' merged weights, as peft's merged layer does."""

    def reference() -> Observed:
        return {"merged output": from_torch(peft_layers.switch_forward(peft_layers.run(case).merged(), case))}

    def run_subject() -> Observed:
        return from_mlx({"merged output": bridge.switch_call(subject.run(case).merged(), case)})

    return measure(
        "merged_forward",
        subject,
        case,
        timer,
        expect=lambda case: {"merged output": oracle.switch_merged_forward(case)},
        reference=reference,
        run_subject=run_subject,
    )


# Error parity -------------------------------------------------------------------------------


REFUSALS = (ValueError, IndexError)
"""The kinds of error a bad configuration or input deserves."""


def refuses(error: BaseException, bad_value: str) -> bool:
    """Whether `error` is the refusal a bad value deserves: of a kind in `REFUSALS`, its message naming the value."""
    names = re.compile(rf"(?<![\w.]){re.escape(bad_value)}(?![\w.])", re.IGNORECASE)
    return isinstance(error, REFUSALS) and names.search(str(error)) is not None


def _outcome(run: Callable[[], torch.Tensor | mx.array]) -> tuple[str, BaseException | None, np.ndarray | None]:
    """What one side did with a bad configuration or input: its description, what it raised or what it computed."""
    try:
        output = run()
    except Exception as error:  # noqa: BLE001 - raising is the expected, good outcome here
        return f"raised {type(error).__name__}: {str(error).splitlines()[0][:160]}", error, None
    values = peft_layers.to_numpy(output) if isinstance(output, torch.Tensor) else bridge.to_numpy(output)
    finite = int(np.isfinite(values).sum())
    return f"computed an output of shape {values.shape} ({finite} of {values.size} elements finite)", None, values


def error_parity(
    subject: Subject,
    case: LinearCase | EmbeddingCase,
    scenario: str,
    bad_value: str,
    subject_run: Callable[[], mx.array],
    reference_run: Callable[[], torch.Tensor],
) -> Measurement:
    """The subject and peft meet a bad configuration or input the same way.

    Where peft raises a clear error, a subject that silently computes something fails; a subject that
    raises must raise the error the bad value deserves (a ValueError or IndexError whose message names
    `bad_value`), even where peft computes (stricter, which is recorded, not failed): any other error
    is a crash for another reason, and fails. Where both compute (NaN or inf inputs), the non-finite
    elements must be the same ones.
    """
    measurement = Measurement(subject.name, "error_parity", {**case.describe(), "scenario": scenario})
    said, error, got = _outcome(subject_run)
    peft_said, _, want = _outcome(reference_run)
    measurement.hints.append(f"subject {said}; peft {peft_said}")
    if error is not None and not refuses(error, bad_value):
        comparison = raised(error, scenario, "subject")
        kinds = " or ".join(kind.__name__ for kind in REFUSALS)
        comparison.problem = (
            f"{said}: not the error {scenario} deserves (a {kinds} naming {bad_value}); peft {peft_said}"
        )
        measurement.comparisons.append(comparison)
    elif error is not None:
        measurement.comparisons.append(Comparison(scenario, "subject", kind="raises", detail=type(error).__name__))
    elif want is None:
        measurement.comparisons.append(failed(f"{said}, but peft {peft_said}", scenario, "subject", "computes"))
    elif got.shape != want.shape or np.any(np.isfinite(got) != np.isfinite(want)):
        problem = f"non-finite elements differ from peft's: subject {said}, peft {peft_said}"
        measurement.comparisons.append(failed(problem, scenario, "subject", "non-finite"))
    else:
        measurement.comparisons.append(Comparison(scenario, "subject"))
    return measurement
