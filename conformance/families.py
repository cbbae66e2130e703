"""Each family of LoRA layers, described once: its cases on each kind of base, its checks with the cases they
draw, their dtypes and example counts, and what the studies draw.

A `Family` is to this suite what an OpInfo is to PyTorch's tests: the test modules (``test_<family>.py``,
``test_quantized_<family>.py``, ``test_conv1d.py``) are generated from it (`conformance.family_tests`), and
the plugin, replay, the benchmark, the studies and the catalogue of wrong variants read it. docs/development.md,
"Adding a family" lists what else a new family needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from hypothesis import assume
from hypothesis import strategies as st

from conformance import checks, model_checks, training_checks
from conformance.checks import Case
from conformance.timing import PhaseTimer
from foundation.cases import EmbeddingCase, LinearCase, embedding_cases, gradients_fit, linear_cases
from foundation.dtypes import FLOAT32, DType
from foundation.model_cases import ModelCase, model_cases
from foundation.switch_cases import switch_cases, switch_gradients_fit
from foundation.verdict import Measurement
from subjects.known import Subject

Check = Callable[[Subject, Any, PhaseTimer], Measurement]
Keep = Callable[[Any], bool]

BASES = ("float", "conv1d", "quantized")
"""What a family's layer may wrap: an ``nn.Linear`` (``nn.Embedding``, ``SwitchLinear``), one that peft sees as
a transformers Conv1D, or a quantized one."""


@dataclass(frozen=True)
class CheckInfo:
    """One check of a family on one base: what it runs, on which of the base's cases, how often and in which dtypes."""

    name: str
    """The name it is recorded under (``forward``, ``merge``, ...)."""
    run: Check
    doc: str
    """What a correct layer does: the generated test's docstring."""
    keep: tuple[Keep, ...] = ()
    """Filters on the base's cases, applied in order, that choose the cases this check draws."""
    examples: int = 1
    """The check draws 1/`examples` of the profile's examples (`profiles.fewer_examples`)."""
    dtypes: tuple[str, ...] | None = None
    """The only case dtypes it runs in, where not all."""
    judges: Keep | None = None
    """Whether it can judge a case at all, where it cannot judge every case (replay and the studies ask)."""
    needs: str | None = None
    """The entry point it calls, where a family's subjects may lack it (a whole model's ``fused``): the attribute of
    a subject's convention; a subject without it is not provided for this check."""
    judges_saved_adapters: bool = False
    """Whether it judges the function a saved adapter file gives (a whole model's adapters saved by one side and
    loaded by another): where its verdict changes between a base and a change, so does what such a file means
    (`reports.regression`)."""

    def runs_in(self, dtype: str) -> bool:
        return self.dtypes is None or dtype in self.dtypes

    def applies(self, case: Case) -> bool:
        return self.judges is None or self.judges(case)

    def not_provided_reason(self, subject: Subject) -> str | None:
        """Why `subject` cannot take this check (it lacks the entry point the check calls), or None."""
        if self.needs is None or hasattr(subject.convention, self.needs):
            return None
        return f"{subject.name} not provided for {self.name}: {subject.distribution} has no {self.needs} entry point"


@dataclass(frozen=True)
class BaseInfo:
    """A family on one kind of base: its test module, its cases and its checks."""

    base: str
    """One of `BASES`."""
    module: str
    """The test module its checks are generated into."""
    cases: Callable[..., st.SearchStrategy]
    """``cases(dtype)``, or on a quantized base ``cases(dtype, kind)``: what every check of the base starts from."""
    checks: tuple[CheckInfo, ...]
    test_prefix: str = ""
    """Where one module holds several families (``test_conv1d.py``): the family's part of its tests' names."""

    def check(self, name: str) -> CheckInfo | None:
        return next((c for c in self.checks if c.name == name), None)

    def test_name(self, check: str) -> str:
        return f"test_{self.test_prefix}{check}"

    def check_id(self, check: str, subject: str, dtype: str, kind: str | None = None) -> str:
        """The pytest id of `check` for `subject` in `dtype` (and, on a quantized base, the quantization `kind`),
        as results and ``known_divergences.txt`` name it."""
        parameters = "-".join([subject, dtype, *([kind] if self.base == "quantized" else [])])
        return f"{self.module}::{self.test_name(check)}[{parameters}]"


@dataclass(frozen=True)
class Family:
    """A family of layers: the subjects of one kind (`Subject.family` names it) and how each of its bases is
    checked."""

    name: str
    layout: str
    """``linear``, ``embedding``, ``switch`` or ``model``: which case model its cases are (the studies' extreme cases
    follow it; a whole model has none)."""
    use_dora: bool
    bases: tuple[BaseInfo, ...]
    study_cases: Callable[[DType], st.SearchStrategy]
    """What the studies draw on a float base: cases every check of the family can take."""
    quantized_study_cases: Callable[[DType, str], st.SearchStrategy] | None = None
    """What the studies draw on a base quantized in a `Quantization.kind`, where the family has one."""
    float32_adapters: bool = False
    """Whether its cases on a half-precision base may hold a float32 adapter (`LinearParameters.adapter_dtype`), as
    its bases' cases draw them: the studies' extreme cases follow it."""
    as_taken: Callable[[Subject, Any], Any] | None = None
    """What a subject makes of a case, where not every subject takes every case as drawn (a whole model of an
    architecture its package does not implement): the case, another it stands for, or None (not drawn for the
    subject). The suite and the studies give each subject its own view of the same draws."""

    def cases_for(self, subject: Subject, cases: st.SearchStrategy) -> st.SearchStrategy:
        """`cases` as `subject` takes them (`as_taken`)."""
        if self.as_taken is None:
            return cases
        return cases.map(lambda case: self.as_taken(subject, case)).filter(lambda case: case is not None)

    def on(self, base: str) -> BaseInfo | None:
        return next((b for b in self.bases if b.base == base), None)

    def checks_on(self, base: str = "float") -> dict[str, CheckInfo]:
        """The family's checks on a base of `BASES`; empty where the suite has no such layer."""
        found = self.on(base)
        return {c.name: c for c in found.checks} if found else {}

    def find_check(self, name: str) -> CheckInfo | None:
        """The check `name` on a float base, else on a quantized one: what replay re-runs."""
        return self.checks_on("float").get(name) or self.checks_on("quantized").get(name)


# --- the cases' filters -------------------------------------------------------------------------


def _with_bias(case: LinearCase) -> bool:
    return case.has_bias


def _with_dropout(case: LinearCase) -> bool:
    return case.dropout > 0


def _steps_fit(optimizer: str) -> Keep:
    """Whether the steps can be judged: the adapter trains in float32, as both packages train one on any base
    (mlx-lm creates float32 adapters, peft upcasts them; in float16, AdamW's v = g^2 underflows), and the steps
    fit the dtype."""
    return lambda case: case.adapter_dtype == FLOAT32 and training_checks.steps_fit(case, optimizer)


def _lookup_gradients_fit(case: EmbeddingCase) -> bool:
    return gradients_fit(case.lookup)


def _lookup_with_dropout(case: EmbeddingCase) -> bool:
    return case.lookup.dropout > 0


def _batched_ids(case: EmbeddingCase) -> bool:
    """Not a single 0-d token id, which ``nn.QuantizedEmbedding`` cannot look up (a known divergence of the base,
    checked by itself in `test_quantized_embedding.py`)."""
    return case.ids.ndim > 0


# --- the checks each family shares ---------------------------------------------------------------


def _linear_training(gradients: Keep, names: tuple[str, ...], docs: dict[str, str]) -> tuple[CheckInfo, ...]:
    """The gradient, dropout and optimizer-step checks of a layer judged as a linear map (`gradients`: whether
    a case's backward pass fits its dtype)."""
    steps = {name: _steps_fit(name.removeprefix("steps_")) for name in ("steps_sgd", "steps_adamw")}
    known = {
        "grad": CheckInfo("grad", training_checks.grad, docs.get("grad", ""), (gradients,)),
        "grad_bias_all": CheckInfo(
            "grad_bias_all",
            training_checks.grad_bias_all,
            docs.get("grad_bias_all", ""),
            (gradients, _with_bias),
            examples=3,
        ),
        "dropout": CheckInfo("dropout", training_checks.dropout, docs.get("dropout", ""), (_with_dropout,), examples=3),
        # Dropout's rescaling does not depend on the dtype, and in half precision the rounding of the outputs
        # would outweigh what the statistic can see: the check could not fail there.
        "dropout_scaling": CheckInfo(
            "dropout_scaling",
            training_checks.dropout_scaling,
            docs.get("dropout_scaling", ""),
            (_with_dropout,),
            examples=5,
            dtypes=("float32",),
        ),
        **{
            name: CheckInfo(
                name,
                getattr(training_checks, name),
                docs.get(name, ""),
                (lambda case, fits=fits: gradients(case) and fits(case),),
                examples=3,
                judges=fits,
            )
            for name, fits in steps.items()
        },
    }
    return tuple(known[name] for name in names)


# --- the families ----------------------------------------------------------------------------------

_LINEAR_TRAINING_DOCS = {
    "grad": "Gradients for A, B and x are peft's and the formulas'; A and B train, the base does not.",
    "grad_bias_all": "With peft's ``bias=\"all\"`` (MLX: the base's bias unfrozen) the bias trains too, "
    "``db = sum_rows(T)``.",
    "dropout": "In training mode, with one keep-mask given to both sides, dropout acts on the adapter's input only: "
    "``x W^T + b + s (x' A^T) B^T`` with ``x' = x * mask / (1 - p)``.",
    "dropout_scaling": "The subject's own dropout is inverted: its training-mode outputs average to the eval output.",
    "steps_sgd": "A few SGD steps on ``1/2 sum((y - Y)^2)`` move A and B as torch's SGD moves peft's.",
    "steps_adamw": "A few AdamW steps (bias-corrected, decoupled weight decay) move A and B as torch's AdamW moves "
    "peft's.",
}
_QLORA_STEPS_DOCS = {
    "steps_sgd": "QLoRA: a few SGD steps of float32 adapters on the quantized base move A and B as torch's SGD moves "
    "peft's on the dequantized weight.",
    "steps_adamw": "QLoRA: a few AdamW steps of float32 adapters on the quantized base move A and B as torch's AdamW "
    "moves peft's on the dequantized weight.",
}
_DORA_TRAINING_DOCS = {
    "grad": "Gradients for A, B, m and x treat ``||W + s B A||`` as a constant, as peft (and the DoRA paper) do; A, B "
    "and m train, the base does not.",
    "grad_bias_all": "With peft's ``bias=\"all\"`` the base's bias trains too.",
    "dropout": "In training mode, with one keep-mask given to both sides: peft's ``x W^T + b + (f - 1) x' W^T + f s "
    "(x' A^T) B^T`` with ``f = m / ||W + s B A||`` and ``x' = x * mask / (1 - p)``.",
}


LINEAR = Family(
    name="linear",
    layout="linear",
    use_dora=False,
    bases=(
        BaseInfo(
            "float",
            "test_linear.py",
            lambda dtype: linear_cases(dtype, float32_adapters=True),
            (
                CheckInfo(
                    "forward",
                    checks.forward,
                    "In eval mode the output is ``x W^T + b + s (x A^T) B^T``, as peft computes it.",
                ),
                CheckInfo(
                    "merge",
                    checks.merge,
                    "The merged layer has weight ``W + s B A``, the same bias, dtype and output as peft's merge.",
                ),
                *_linear_training(
                    gradients_fit,
                    ("grad", "grad_bias_all", "dropout", "dropout_scaling", "steps_sgd", "steps_adamw"),
                    _LINEAR_TRAINING_DOCS,
                ),
            ),
        ),
        BaseInfo(
            "quantized",
            "test_quantized_linear.py",
            lambda dtype, kind: linear_cases(dtype, quantized=kind, float32_adapters=True),
            (
                CheckInfo(
                    "forward",
                    checks.forward,
                    "On a ``QuantizedLinear`` the output is LoRA's on the dequantized weight.",
                    examples=5,
                ),
                CheckInfo(
                    "merge",
                    checks.merge,
                    "``fuse(dequantize=True)`` gives ``W_dequantized + s B A`` in the base "
                    "dtype, as peft's merge does.",
                    examples=5,
                ),
                CheckInfo(
                    "requantize",
                    checks.requantize,
                    "``fuse()`` re-quantizes exactly that merge, in the base's mode, bit width and group size.",
                    examples=5,
                ),
                CheckInfo(
                    "grad",
                    training_checks.grad,
                    "QLoRA: A, B and x get LoRA's gradients on the dequantized "
                    "weight; the quantized base does not train.",
                    (gradients_fit,),
                    examples=5,
                ),
                *(
                    replace(check, examples=10)
                    for check in _linear_training(gradients_fit, ("steps_sgd", "steps_adamw"), _QLORA_STEPS_DOCS)
                ),
            ),
        ),
        BaseInfo(
            "conv1d",
            "test_conv1d.py",
            lambda dtype: linear_cases(dtype, fan_in_fan_out=True, float32_adapters=True),
            (
                CheckInfo(
                    "forward", checks.forward, "LoRA's output, against peft's LoRA on a Conv1D base.", examples=3
                ),
                CheckInfo(
                    "merge",
                    checks.merge,
                    "The merged weight (transposed back from peft's (in, out)), bias, dtype and output.",
                    examples=3,
                ),
            ),
            test_prefix="lora_",
        ),
    ),
    # their checks include the gradients
    study_cases=lambda dtype: linear_cases(dtype, float32_adapters=True).filter(gradients_fit),
    quantized_study_cases=lambda dtype, kind: linear_cases(dtype, quantized=kind, float32_adapters=True).filter(
        gradients_fit
    ),
    float32_adapters=True,
)

DORA_LINEAR = Family(
    name="dora_linear",
    layout="linear",
    use_dora=True,
    bases=(
        BaseInfo(
            "float",
            "test_dora_linear.py",
            lambda dtype: linear_cases(dtype, use_dora=True, float32_adapters=True),
            (
                CheckInfo(
                    "forward",
                    checks.forward,
                    "In eval mode the output is ``m / ||W + s B A|| * (x W^T + s (x A^T) "
                    "B^T) + b``, as peft computes it.",
                ),
                CheckInfo(
                    "merge",
                    checks.merge,
                    "The merged weight is ``m / ||W + s B A|| * (W + s B A)``; bias, dtype and output as peft's merge.",
                ),
                CheckInfo(
                    "init",
                    checks.init,
                    "Created on a base, with B zero, the magnitude is the base weight's row norms ``||W||``.",
                ),
                CheckInfo(
                    "init_with_adapter",
                    checks.init_with_adapter,
                    "Derived with a non-zero B in place, the magnitude is ``||W + s B A||``, as peft derives it.",
                ),
                *_linear_training(
                    gradients_fit,
                    ("grad", "grad_bias_all", "dropout"),
                    _DORA_TRAINING_DOCS,
                ),
            ),
        ),
        BaseInfo(
            "quantized",
            "test_quantized_dora_linear.py",
            lambda dtype, kind: linear_cases(dtype, use_dora=True, quantized=kind, float32_adapters=True),
            (
                CheckInfo(
                    "forward",
                    checks.forward,
                    "On a ``QuantizedLinear`` the output is DoRA's on the dequantized weight.",
                    examples=10,
                ),
                CheckInfo(
                    "merge",
                    checks.merge,
                    "``fuse(dequantize=True)`` gives DoRA's merge of the dequantized weight "
                    "in the base dtype, as peft's merge does.",
                    examples=10,
                ),
                CheckInfo(
                    "requantize",
                    checks.requantize,
                    "``fuse()`` re-quantizes exactly that merge, in the base's mode, bit width and group size.",
                    examples=10,
                ),
                CheckInfo(
                    "init",
                    checks.init,
                    "Created on a quantized base, the magnitude is the dequantized weight's row norms.",
                    examples=10,
                ),
                CheckInfo(
                    "grad",
                    training_checks.grad,
                    "QDoRA: A, B, m and x get DoRA's gradients on the dequantized weight (norm detached).",
                    (gradients_fit,),
                    examples=10,
                ),
            ),
        ),
        BaseInfo(
            "conv1d",
            "test_conv1d.py",
            lambda dtype: linear_cases(dtype, use_dora=True, fan_in_fan_out=True, float32_adapters=True),
            (
                CheckInfo(
                    "forward", checks.forward, "DoRA's output, against peft's DoRA on a Conv1D base.", examples=3
                ),
                CheckInfo(
                    "merge",
                    checks.merge,
                    "DoRA's merged weight, bias, dtype and output, against peft's merge on a Conv1D base.",
                    examples=3,
                ),
            ),
            test_prefix="dora_",
        ),
    ),
    study_cases=lambda dtype: linear_cases(dtype, use_dora=True, float32_adapters=True).filter(gradients_fit),
    quantized_study_cases=lambda dtype, kind: linear_cases(
        dtype, use_dora=True, quantized=kind, float32_adapters=True
    ).filter(gradients_fit),
    float32_adapters=True,
)

_EMBEDDING_STEPS = {
    "steps_sgd": "A few SGD steps on ``1/2 sum((y - Y)^2)`` move A and B as torch's SGD moves peft's (the rows of A a "
    "batch does not look up stay where they are).",
    "steps_adamw": "A few AdamW steps move A and B as torch's AdamW moves peft's; rows not looked up still decay.",
}

EMBEDDING = Family(
    name="embedding",
    layout="embedding",
    use_dora=False,
    bases=(
        BaseInfo(
            "float",
            "test_embedding.py",
            lambda dtype: embedding_cases(dtype, float32_adapters=True),
            (
                CheckInfo(
                    "forward",
                    checks.lookup,
                    "In eval mode a lookup is ``W[ids] + s A^T[ids] B^T``, as peft's LoRA Embedding computes it.",
                ),
                CheckInfo(
                    "as_linear",
                    checks.as_linear,
                    "``as_linear`` (a tied output head) is ``hidden @ (W + s A^T "
                    "B^T)^T``: hidden against peft's merged table.",
                ),
                CheckInfo(
                    "merge",
                    checks.embedding_merge,
                    "The merged table is ``W + s A^T B^T`` in the base dtype, and looks up what peft's merge does.",
                ),
                CheckInfo(
                    "grad",
                    training_checks.grad,
                    "Gradients for A and B of ``sum(y * T)`` are peft's and the "
                    "formulas'; A and B train, the table does not.",
                    (_lookup_gradients_fit,),
                    examples=2,
                ),
                CheckInfo(
                    "dropout",
                    training_checks.dropout,
                    "In training mode, with one keep-mask given to every "
                    "dropout module: peft's LoRA Embedding applies no dropout (ids cannot be dropped), so the "
                    "lookup is the eval one.",
                    (_lookup_with_dropout,),
                    examples=3,
                ),
                *(
                    CheckInfo(
                        name,
                        getattr(training_checks, name),
                        doc,
                        (
                            lambda case, fits=_steps_fit(name.removeprefix("steps_")): (
                                gradients_fit(case.lookup) and fits(case)
                            ),
                        ),
                        examples=3,
                        judges=_steps_fit(name.removeprefix("steps_")),
                    )
                    for name, doc in _EMBEDDING_STEPS.items()
                ),
            ),
        ),
        BaseInfo(
            "quantized",
            "test_quantized_embedding.py",
            lambda dtype, kind: embedding_cases(dtype, quantized=kind, float32_adapters=True),
            (
                CheckInfo(
                    "forward",
                    checks.lookup,
                    "Lookups of batches of ids are ``W[ids] + s A^T[ids] B^T`` on the "
                    "dequantized table, in the model's dtype.",
                    (_batched_ids,),
                    examples=10,
                ),
                CheckInfo(
                    "as_linear",
                    checks.as_linear,
                    "The tied output head multiplies by the adapted dequantized table.",
                    examples=10,
                ),
                CheckInfo(
                    "merge",
                    checks.embedding_merge,
                    "``fuse(dequantize=True)`` gives the table ``W + s A^T B^T`` "
                    "in the base dtype, as peft's merge does.",
                    examples=10,
                ),
                CheckInfo(
                    "requantize",
                    checks.requantize,
                    "``fuse()`` re-quantizes exactly that merge, in the base's mode, bit width and group size.",
                    examples=10,
                ),
            ),
        ),
    ),
    study_cases=lambda dtype: embedding_cases(dtype, float32_adapters=True).filter(_lookup_gradients_fit),
    quantized_study_cases=lambda dtype, kind: embedding_cases(dtype, quantized=kind, float32_adapters=True).filter(
        _batched_ids
    ),
    float32_adapters=True,
)

DORA_EMBEDDING = Family(
    name="dora_embedding",
    layout="embedding",
    use_dora=True,
    bases=(
        BaseInfo(
            "float",
            "test_dora_embedding.py",
            lambda dtype: embedding_cases(dtype, use_dora=True, float32_adapters=True),
            (
                CheckInfo(
                    "forward",
                    checks.lookup,
                    "A lookup is ``m / ||W + s A^T B^T||_columns * (W + s A^T B^T)[ids]``, as peft computes it.",
                ),
                CheckInfo("as_linear", checks.as_linear, "``as_linear`` is ``hidden @ merged table^T``."),
                CheckInfo(
                    "merge",
                    checks.embedding_merge,
                    "The merged table is ``m / ||W + s A^T B^T||_columns * (W + s A^T B^T)`` in the base dtype.",
                ),
                CheckInfo(
                    "init", checks.init, "Created on a base, the magnitude is the table's norm per embedding dimension."
                ),
                CheckInfo(
                    "init_with_adapter",
                    checks.init_with_adapter,
                    "Derived with a non-zero B in place, the magnitude is the adapted table's norm per dimension.",
                ),
            ),
        ),
    ),
    study_cases=lambda dtype: embedding_cases(dtype, use_dora=True, float32_adapters=True),
    float32_adapters=True,
)

SWITCH_LINEAR = Family(
    name="switch_linear",
    layout="switch",
    use_dora=False,
    bases=(
        BaseInfo(
            "float",
            "test_switch_linear.py",
            lambda dtype: switch_cases(dtype, float32_adapters=True),
            (
                CheckInfo(
                    "forward",
                    checks.switch_forward,
                    "Each routed output is ``x W_e^T + b_e + s (x A_e^T) B_e^T`` for the token's expert e.",
                    examples=2,
                ),
                CheckInfo(
                    "merge",
                    checks.switch_merge,
                    "``fuse()`` gives every expert ``W_e + s B_e A_e`` and its bias, "
                    "in the base dtype, as peft's merge.",
                    examples=2,
                ),
                CheckInfo(
                    "merged_forward",
                    checks.switch_merged_forward,
                    "The fused layer routes tokens to their experts' merged weights.",
                    examples=2,
                ),
                CheckInfo(
                    "grad",
                    training_checks.switch_grad,
                    "Expert e's A and B get the gradients of the tokens routed "
                    "to it, x the sum over its experts; the adapters train, the experts' weights do not.",
                    (switch_gradients_fit,),
                    examples=2,
                ),
            ),
        ),
        BaseInfo(
            "quantized",
            "test_quantized_switch_linear.py",
            lambda dtype, kind: switch_cases(dtype, kind, float32_adapters=True),
            (
                CheckInfo(
                    "forward",
                    checks.switch_forward,
                    "Each routed output is LoRA's on the token's expert's dequantized weight.",
                    examples=10,
                ),
                CheckInfo(
                    "merge",
                    checks.switch_merge,
                    "``fuse(dequantize=True)`` gives every expert ``W_e + s B_e A_e`` "
                    "in the base dtype, as peft's merge.",
                    examples=10,
                ),
                CheckInfo(
                    "merged_forward",
                    checks.switch_merged_forward,
                    "The dequantized fused layer routes tokens to their experts' merged weights.",
                    examples=10,
                ),
                CheckInfo(
                    "requantize",
                    checks.requantize,
                    "``fuse()`` re-quantizes exactly that merge, in the base's mode, bit width and group size.",
                    examples=10,
                ),
            ),
        ),
    ),
    study_cases=lambda dtype: switch_cases(dtype, float32_adapters=True).filter(switch_gradients_fit),
    quantized_study_cases=lambda dtype, kind: switch_cases(dtype, kind, float32_adapters=True),
    float32_adapters=True,
)


def _model_check(
    name: str,
    doc: str,
    examples: int,
    needs: str,
    fits: Keep = model_checks.fits_dtype,
    dtypes: tuple[str, ...] | None = None,
    judges_saved_adapters: bool = False,
) -> CheckInfo:
    """A whole-model check (`conformance.model_checks`): it draws, and judges, only the cases `fits` takes (a model
    its dtype holds), and calls the subject's entry point `needs`."""
    run = _as_taken(getattr(model_checks, name), fits)
    info = CheckInfo(name, run, doc, (fits,), examples=examples, judges=fits, needs=needs)
    return replace(info, dtypes=dtypes, judges_saved_adapters=judges_saved_adapters)


def _as_taken(check: Callable[..., Measurement], fits: Keep | None = None) -> Callable[..., Measurement]:
    """`check` on the case as the subject takes it (`_model_as_taken`). The suite draws one case for every subject (a
    test's cases follow from its source, which names no subject), so a case a subject cannot take, or whose stand-in
    its dtype does not hold, is rejected there (Hypothesis's `assume`) and another drawn."""

    def run(subject: Subject, case: ModelCase, *arguments: Any) -> Measurement:
        taken = _model_as_taken(subject, case)
        assume(taken is not None and (taken is case or fits is None or fits(taken)))
        return check(subject, taken, *arguments)

    run.__name__, run.__doc__ = check.__name__, check.__doc__
    return run


def _model_as_taken(subject: Subject, case: ModelCase) -> ModelCase | None:
    """A whole model as `subject`'s package takes it: as drawn where it implements the architecture; a vision-language
    model's language part, as the text model it is, where it implements text models only (mlx-lm), so that every
    subject draws alike and shares what is built from a case; otherwise not at all."""
    if case.architecture in subject.convention.architectures:
        return case
    language = case.language_model()
    return language if language.architecture in subject.convention.architectures else None


ADAM_MODEL_DTYPES = ("bfloat16",)
"""Where Adam's steps are judged. Adam moves an entry by about the learning rate whatever its gradient's size, which
makes two differences of MLX's visible that the verdict cannot yet tell from a bug. In float32, MLX's ``Adam``
computes the bias correction ``1 - b2^t`` in float32 from b2 rounded to float32, so its steps are 6.4e-6 short of
torch's (margins up to 6.2 in correct cases, where an Adam that computes it in double passes; the movement it reports
is not always 0.99999x, so no entry can recognise it alone). In float16, MLX computes a DoRA layer's magnitude
gradient in float16, where it is subnormal (a true 3.5e-7 becomes 0; peft's, in float32, is within 4%): 7 of 295
cases failed. In bfloat16 both are far below rounding (539 cases, largest margin 0.46)."""


QUANTIZED_MODEL_DTYPES = ("bfloat16",)
"""Where a quantized model is checked: what QLoRA trains in. Its glue (the quantized files, the fuse with and without
``--dequantize``) is the same in every dtype, and each parametrization costs ci time."""


MODEL = Family(
    name="model",
    layout="model",
    use_dora=False,
    bases=(
        BaseInfo(
            "float",
            "test_models.py",
            model_cases,
            (
                _model_check(
                    "logits",
                    "A tiny model adapted by the package's own loaders gives the logits peft's ``get_peft_model`` "
                    "gives on the transformers model, for the bridged configuration.",
                    examples=4,  # a wrong scale or a missing layer is seen in about 1 bfloat16 case in 7
                    needs="adapted",
                    judges_saved_adapters=True,
                ),
                _model_check(
                    "rope_parameters",
                    "The same logits where ``config.json`` names the rotary base only under ``rope_parameters``, as "
                    "transformers 5 saves a model.",
                    examples=15,
                    needs="adapted",
                ),
                CheckInfo(
                    "adapted_modules",
                    _as_taken(model_checks.adapted_modules),
                    "The configuration adapts the modules peft adapts for the bridged ``LoraConfig``.",
                    examples=15,
                    needs="adapted",
                ),
                _model_check(
                    "steps_sgd",
                    "A few SGD steps through the package's training path (its loss, MLX's SGD) move the adapters, and "
                    "give the losses, that torch's SGD gives peft's model; only the adapters train.",
                    examples=15,
                    needs="trained",
                    fits=model_checks.trainable_steps,
                ),
                _model_check(
                    "steps_adam",
                    "The same with Adam (mlx-lm's default optimizer, bias-corrected as ``optimizer_config`` can ask) "
                    "against torch's Adam.",
                    examples=15,
                    needs="trained",
                    fits=model_checks.trainable_adam_steps,
                    dtypes=ADAM_MODEL_DTYPES,
                ),
                _model_check(
                    "adapters_in_peft",
                    "The adapters the package saves, converted to peft's files (``python -m conformance.adapters "
                    "to-peft``) and loaded by ``PeftModel.from_pretrained``, give peft's logits. Drawn on what the "
                    "converter converts: text models.",
                    examples=10,
                    needs="adapter_directory",
                    fits=model_checks.converts,
                    judges_saved_adapters=True,
                ),
                _model_check(
                    "adapters_from_peft",
                    "peft's adapters as ``save_pretrained`` saves them, converted to the package's files (``python -m "
                    "conformance.adapters to-mlx``) and loaded by the package's own loader, give peft's logits. Drawn "
                    "on what the converter converts: text models.",
                    examples=10,
                    needs="adapted",
                    fits=model_checks.converts,
                    judges_saved_adapters=True,
                ),
                _model_check(
                    "fuse",
                    "The fused model the package saves gives the logits of peft's ``merge_and_unload()``.",
                    examples=15,
                    needs="fused",
                ),
                _model_check(
                    "fused_in_transformers",
                    "The fused model the package saves loads in transformers and gives the logits of peft's "
                    "``merge_and_unload()``.",
                    examples=15,
                    needs="fused_directory",
                ),
            ),
        ),
        BaseInfo(
            "quantized",
            "test_quantized_models.py",
            lambda dtype, kind: model_cases(dtype, quantized=kind),
            (
                _model_check(
                    "logits",
                    "A model whose MLX copy is quantized (``mlx_lm.convert -q``), adapted by the package's own loaders "
                    "(QLoRA), gives the logits peft gives on the values the quantized weights hold.",
                    examples=10,
                    needs="adapted",
                    dtypes=QUANTIZED_MODEL_DTYPES,
                    judges_saved_adapters=True,
                ),
                _model_check(
                    "fuse",
                    "``fuse --dequantize`` saves the model of peft's ``merge_and_unload()`` on the values the "
                    "quantized weights hold.",
                    examples=10,
                    needs="fused",
                    dtypes=QUANTIZED_MODEL_DTYPES,
                ),
                _model_check(
                    "requantize",
                    "``fuse`` without ``--dequantize`` re-quantizes exactly the merge ``--dequantize`` saves, in the "
                    "base's quantization, and leaves the other layers as they were.",
                    examples=10,
                    needs="fused_directory",
                    dtypes=QUANTIZED_MODEL_DTYPES,
                ),
                _model_check(
                    "steps_sgd",
                    "QLoRA training: a few SGD steps through the package's training path on the quantized model move "
                    "the adapters, and give the losses, that torch's SGD gives peft's model on the values the "
                    "quantized weights hold.",
                    # the fewest a check draws (10) per quantization: peft trains in 8 orders for each case
                    examples=15,
                    needs="trained",
                    fits=model_checks.trainable_steps,
                    dtypes=QUANTIZED_MODEL_DTYPES,
                ),
            ),
        ),
    ),
    study_cases=model_cases,
    quantized_study_cases=lambda dtype, kind: model_cases(dtype, quantized=kind),
    as_taken=_model_as_taken,
)
"""Whole tiny models through the packages' own entry points (`subjects.models`), judged as a whole
(`foundation.model_verdict`)."""

FAMILIES: dict[str, Family] = {
    f.name: f for f in (LINEAR, DORA_LINEAR, EMBEDDING, DORA_EMBEDDING, SWITCH_LINEAR, MODEL)
}
"""Every family, by the name its subjects give (`Subject.family`)."""

MODULE_ORDER = tuple(
    dict.fromkeys(
        base.module.removeprefix("test_").removesuffix(".py") for family in FAMILIES.values() for base in family.bases
    )
) + ("error_parity",)
"""The report's tables, by test module: each family's, the float base first, then its variants."""


def find_check(family: str, name: str) -> CheckInfo | None:
    """The check `name` of a family, on a float or a quantized base: what replay can re-run."""
    found = FAMILIES.get(family)
    return found.find_check(name) if found else None


def judges_saved_adapters(check_id: str, name: str) -> bool:
    """Whether the check `name` of test item `check_id` (``test_models.py::test_logits[...]``) judges the function a
    saved adapter file gives (`CheckInfo.judges_saved_adapters`)."""
    module = check_id.partition("::")[0]
    return any(
        base.module == module and (check := base.check(name)) is not None and check.judges_saved_adapters
        for family in FAMILIES.values()
        for base in family.bases
    )


def replayable(name: str) -> bool:
    return any(family.find_check(name) for family in FAMILIES.values())
