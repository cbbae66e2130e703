"""Bad configurations and inputs: where peft raises a clear error, the subject must not compute silently.

Each scenario starts from one fixed, valid case per dtype and breaks one thing: the rank, the
dropout, the input's width, its values (NaN, inf), an embedding's token ids or a switch layer's
expert indices.
"""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import torch

from conformance import checks
from conformance.asserting import record_and_assert
from foundation.cases import EmbeddingCase, LinearCase, make_embedding_case, make_linear_case
from foundation.switch_cases import Case, SwitchCase, make_switch_case
from reference import peft_layers
from subjects import bridge

pytestmark = pytest.mark.check("error_parity")

PARAMETERS = dict(
    r=2, alpha=4.0, use_rslora=False, dropout=0.0, batch_shape=(3,), magnitudes=(1.0, 1.0, 1.0, 1.0), seed=7
)
CONFIGURATIONS = {
    "r=0": dict(r=0),
    "r=-1": dict(r=-1),
    "dropout=-0.1": dict(dropout=-0.1),
    "dropout=1.5": dict(dropout=1.5),
}


def _linear_case(dtype, use_dora: bool) -> LinearCase:
    return make_linear_case(dtype=dtype, in_features=8, out_features=5, has_bias=True, use_dora=use_dora, **PARAMETERS)


def _with_input(case: Case, x: np.ndarray) -> Case:
    if isinstance(case, SwitchCase):
        return replace(case, experts=tuple(replace(expert, x=x) for expert in case.experts))
    return replace(case, x=x)


def _with_value(case: Case, value: float) -> Case:
    x = case.x.copy()
    x[0, 1] = value
    return _with_input(case, x)


BROKEN_INPUTS = {
    "input one wider": (
        lambda case: _with_input(case, np.ones((3, case.x.shape[-1] + 1))),
        lambda case: case.x.shape[-1] + 1,
    ),
    "NaN input": (lambda case: _with_value(case, np.nan), lambda case: "nan"),
    "inf input": (lambda case: _with_value(case, np.inf), lambda case: "inf"),
    "token id -1": (
        lambda case: replace(case, ids=np.where(np.arange(case.ids.size) == 0, -1, case.ids)),
        lambda case: -1,
    ),
    "token id = vocabulary": (
        lambda case: replace(case, ids=np.where(np.arange(case.ids.size) == 0, case.lookup.in_features, case.ids)),
        lambda case: case.lookup.in_features,
    ),
    "expert index = experts": (
        lambda case: replace(
            case, indices=np.where(case.indices == 0, case.num_experts, case.indices).astype(np.uint32)
        ),
        lambda case: case.num_experts,
    ),
}
"""How each input scenario breaks a valid case, and the bad value it puts there (an error should name it)."""


def _subject_output(layer, case: Case) -> mx.array:
    if isinstance(case, SwitchCase):
        output = bridge.switch_call(layer, case)
    elif isinstance(case, EmbeddingCase):
        output = layer(mx.array(case.ids))
    else:
        output = layer(bridge.mlx_array(case.x, case.dtype))
    mx.eval(output)
    return output


def _reference_output(layer, case: Case) -> torch.Tensor:
    if isinstance(case, SwitchCase):
        return peft_layers.switch_forward(layer, case)
    with torch.no_grad():
        if isinstance(case, EmbeddingCase):
            return layer(torch.tensor(case.ids))
        return layer(peft_layers.tensor(case.x, case.dtype))


def _reference_layer(case: Case):
    """peft's layer holding the case's adapter."""
    if isinstance(case, SwitchCase):
        return peft_layers.switch(case)
    return peft_layers.embedding(case) if isinstance(case, EmbeddingCase) else peft_layers.linear(case)


def _check(subject, case: Case, scenario: str, recorder) -> None:
    """Run one scenario on both sides."""
    view = getattr(case, "lookup", None) or getattr(case, "first", case)
    if scenario in CONFIGURATIONS:
        r, dropout = CONFIGURATIONS[scenario].get("r", view.r), CONFIGURATIONS[scenario].get("dropout", view.dropout)
        broken, (bad_value,) = case, CONFIGURATIONS[scenario].values()
    else:
        r, dropout = view.r, view.dropout
        breaking, bad = BROKEN_INPUTS[scenario]
        broken, bad_value = breaking(case), bad(case)
    configured = scenario in CONFIGURATIONS

    def subject_run():
        layer = subject.construct(case, r, dropout) if configured else subject.build(case)
        return _subject_output(layer, broken)

    def reference_run():
        layer = peft_layers.construct(case, r, dropout) if configured else _reference_layer(case)
        return _reference_output(layer, broken)

    record_and_assert(
        recorder, checks.error_parity(subject, case, scenario, str(bad_value), subject_run, reference_run)
    )


LINEAR_SCENARIOS = [*CONFIGURATIONS, "input one wider", "NaN input", "inf input"]
EMBEDDING_SCENARIOS = [*CONFIGURATIONS, "token id -1", "token id = vocabulary"]


@pytest.mark.family("linear")
@pytest.mark.parametrize("scenario", LINEAR_SCENARIOS)
def test_linear(subject, dtype, scenario, recorder):
    """LoRA on a Linear: bad rank or dropout, a wrong input width, NaN and inf inputs."""
    _check(subject, _linear_case(dtype, use_dora=False), scenario, recorder)


@pytest.mark.family("dora_linear")
@pytest.mark.parametrize("scenario", LINEAR_SCENARIOS)
def test_dora_linear(subject, dtype, scenario, recorder):
    """DoRA on a Linear: the same scenarios."""
    _check(subject, _linear_case(dtype, use_dora=True), scenario, recorder)


@pytest.mark.family("embedding")
@pytest.mark.parametrize("scenario", EMBEDDING_SCENARIOS)
def test_embedding(subject, dtype, scenario, recorder):
    """LoRA on an Embedding: bad rank or dropout, token ids outside the vocabulary."""
    _check(subject, make_embedding_case(6, 4, dtype=dtype, use_dora=False, **PARAMETERS), scenario, recorder)


@pytest.mark.family("dora_embedding")
@pytest.mark.parametrize("scenario", EMBEDDING_SCENARIOS)
def test_dora_embedding(subject, dtype, scenario, recorder):
    """DoRA on an Embedding: the same scenarios."""
    _check(subject, make_embedding_case(6, 4, dtype=dtype, use_dora=True, **PARAMETERS), scenario, recorder)


@pytest.mark.family("switch_linear")
@pytest.mark.parametrize("scenario", [*LINEAR_SCENARIOS, "expert index = experts"])
def test_switch_linear(subject, dtype, scenario, recorder):
    """LoRA on experts: bad rank or dropout, wrong input width, NaN and inf inputs, an expert index past the last."""
    case = make_switch_case(3, 2, False, dtype=dtype, in_features=8, out_features=5, has_bias=True, **PARAMETERS)
    _check(subject, case, scenario, recorder)
