"""Which checks each family of layers has, on a plain and on a quantized base, and in which dtypes."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import strategies as st

from conformance import checks, training_checks
from conformance.timing import PhaseTimer
from foundation.cases import EmbeddingCase, LinearCase, embedding_cases, gradients_fit, linear_cases
from foundation.dtypes import DType
from foundation.switch_cases import SwitchCase, switch_cases, switch_gradients_fit
from foundation.verdict import Measurement
from subjects.known import Subject

Check = Callable[[Subject, "LinearCase | EmbeddingCase", PhaseTimer], Measurement]

_LORA_TRAINING = {
    "grad": training_checks.grad,
    "grad_bias_all": training_checks.grad_bias_all,
    "dropout": training_checks.dropout,
    "dropout_scaling": training_checks.dropout_scaling,
    "steps_sgd": training_checks.steps_sgd,
    "steps_adamw": training_checks.steps_adamw,
}
_EMBEDDING = {"forward": checks.lookup, "as_linear": checks.as_linear, "merge": checks.embedding_merge}
_DORA_INIT = {"init": checks.init, "init_with_adapter": checks.init_with_adapter}
_SWITCH = {
    "forward": checks.switch_forward,
    "merge": checks.switch_merge,
    "merged_forward": checks.switch_merged_forward,
}

FAMILY_CHECKS: dict[str, dict[str, Check]] = {
    "linear": {"forward": checks.forward, "merge": checks.merge, **_LORA_TRAINING},
    "dora_linear": {
        "forward": checks.forward,
        "merge": checks.merge,
        **{name: _LORA_TRAINING[name] for name in ("grad", "grad_bias_all", "dropout")},
        **_DORA_INIT,
    },
    "embedding": {
        **_EMBEDDING,
        **{name: _LORA_TRAINING[name] for name in ("grad", "dropout", "steps_sgd", "steps_adamw")},
    },
    "dora_embedding": {**_EMBEDDING, **_DORA_INIT},
    "switch_linear": {**_SWITCH, "grad": training_checks.switch_grad},
}
"""Each family's checks by the name they are recorded under."""
QUANTIZED_CHECKS: dict[str, dict[str, Check]] = {
    "linear": {"forward": checks.forward, "merge": checks.merge, "requantize": checks.requantize, "grad": training_checks.grad},
    "dora_linear": {
        "forward": checks.forward,
        "merge": checks.merge,
        "requantize": checks.requantize,
        "init": checks.init,
        "grad": training_checks.grad,
    },
    "switch_linear": {**_SWITCH, "requantize": checks.requantize},
    "embedding": {**_EMBEDDING, "requantize": checks.requantize},
}
"""The checks of a family on a quantized base, where it has one."""
CONV1D_CHECKS: dict[str, tuple[str, ...]] = {"linear": ("forward", "merge"), "dora_linear": ("forward", "merge")}
"""The checks of a family on a base in transformers' Conv1D layout (``test_conv1d.py``), where it has one."""

BASES = ("float", "conv1d", "quantized")
"""What a family's layer may wrap: an ``nn.Linear`` (``nn.Embedding``, ``SwitchLinear``), one that peft sees as
a transformers Conv1D, or a quantized one."""


def checks_on(family: str, base: str = "float") -> dict[str, Check]:
    """A family's checks on a base of `BASES`; empty where the suite has no such layer."""
    if base == "quantized":
        return QUANTIZED_CHECKS.get(family, {})
    if base == "conv1d":
        return {name: FAMILY_CHECKS[family][name] for name in CONV1D_CHECKS.get(family, ())}
    return FAMILY_CHECKS.get(family, {})

ONLY_IN: dict[str, tuple[str, ...]] = {
    # Dropout's rescaling does not depend on the dtype, and in half precision the rounding of the
    # outputs would outweigh what the statistic can see: the check could not fail there.
    "dropout_scaling": ("float32",),
    # Training in half precision keeps float32 adapters (mlx-lm creates them so), and AdamW's
    # v = g^2 underflows in float16.
    "steps_sgd": ("float32",),
    "steps_adamw": ("float32",),
}
"""Checks that run in some case dtypes only (test modules mark them with ``pytest.mark.dtypes``)."""


APPLIES_TO: dict[str, Callable[[LinearCase | EmbeddingCase], bool]] = {
    "steps_sgd": lambda case: training_checks.steps_fit(case, "sgd"),
    "steps_adamw": lambda case: training_checks.steps_fit(case, "adamw"),
}
"""Checks that judge only some of their family's cases (test modules filter their cases with it)."""


def runs_in(check: str, dtype: str) -> bool:
    return dtype in ONLY_IN.get(check, (dtype,))


def applies(check: str, case: LinearCase | EmbeddingCase) -> bool:
    """Whether `check` can judge `case` at all (see `APPLIES_TO`)."""
    return check not in APPLIES_TO or APPLIES_TO[check](case)


def find_check(family: str, name: str) -> Check | None:
    """The check `name` of a family, on a plain or a quantized base: what ``replay`` can re-run."""
    return FAMILY_CHECKS.get(family, {}).get(name) or QUANTIZED_CHECKS.get(family, {}).get(name)


def replayable(name: str) -> bool:
    return any(find_check(family, name) for family in FAMILY_CHECKS)


def quantized_cases_for(
    family: str, dtype: DType, kind: str
) -> st.SearchStrategy[LinearCase | EmbeddingCase | SwitchCase]:
    """The cases a family is checked on with a base quantized in `kind` (a `Quantization.kind`), as its
    ``test_quantized_<family>.py`` draws them; like `cases_for`, only cases whose gradients fit where the
    family's quantized checks include them, and (embedding) no single 0-d token id, which
    ``nn.QuantizedEmbedding`` cannot look up (a known divergence of the base, checked by itself)."""
    if family == "switch_linear":
        return switch_cases(dtype, kind)
    if family == "embedding":
        return embedding_cases(dtype, quantized=kind).filter(lambda case: case.ids.ndim > 0)
    return linear_cases(dtype, use_dora=family.startswith("dora_"), quantized=kind).filter(gradients_fit)


def cases_for(family: str, dtype: DType) -> st.SearchStrategy[LinearCase | EmbeddingCase | SwitchCase]:
    """The cases a family of layers is checked on."""
    if family == "switch_linear":
        return switch_cases(dtype).filter(switch_gradients_fit)  # as the others: their checks include the gradients
    use_dora = family.startswith("dora_")
    if family.endswith("embedding"):
        cases = embedding_cases(dtype, use_dora=use_dora)
        return cases if use_dora else cases.filter(lambda case: gradients_fit(case.lookup))
    return linear_cases(dtype, use_dora=use_dora).filter(gradients_fit)  # their checks include the gradients
