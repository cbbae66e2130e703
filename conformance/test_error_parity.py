"""Bad configurations and inputs: where peft raises a clear error, the subject must not compute silently.

Each scenario starts from one fixed, valid case per dtype and breaks one thing: the rank, the
dropout, the input's width, its values (NaN, inf) or an embedding's token ids.
"""

import mlx.core as mx
import numpy as np
import pytest
import torch

from conformance import checks
from conformance.asserting import record_and_assert
from conformance.cases import make_embedding_case, make_linear_case
from reference import bridge, peft_layers

pytestmark = pytest.mark.check("error_parity")

PARAMETERS = dict(r=2, alpha=4.0, use_rslora=False, dropout=0.0, batch_shape=(3,), magnitudes=(1.0, 1.0, 1.0, 1.0), seed=7)
CONFIGURATIONS = {"r=0": dict(r=0), "r=-1": dict(r=-1), "dropout=-0.1": dict(dropout=-0.1), "dropout=1.5": dict(dropout=1.5)}


def _linear_case(dtype, use_dora):
    return make_linear_case(dtype=dtype, in_features=8, out_features=5, has_bias=True, use_dora=use_dora, **PARAMETERS)


def _with_values(x: np.ndarray, value: float) -> np.ndarray:
    x = x.copy()
    x[0, 1] = value
    return x


def _linear_inputs(case):
    wider = np.ones((3, case.in_features + 1))
    return {"input one wider": wider, "NaN input": _with_values(case.x, np.nan), "inf input": _with_values(case.x, np.inf)}


def _parity_of_configuration(subject, case, scenario, recorder):
    overrides = CONFIGURATIONS[scenario]
    r, dropout = overrides.get("r", PARAMETERS["r"]), overrides.get("dropout", PARAMETERS["dropout"])
    view = getattr(case, "lookup", case)
    x = case.ids if hasattr(case, "ids") else case.x

    def subject_run():
        layer = subject.construct(case, r, dropout)
        output = layer(mx.array(x) if hasattr(case, "ids") else bridge.mlx_array(x, view.dtype))
        mx.eval(output)
        return output

    def reference_run():
        layer = peft_layers.construct(case, r, dropout)
        with torch.no_grad():
            return layer(torch.from_numpy(x) if hasattr(case, "ids") else peft_layers.tensor(x, view.dtype))

    record_and_assert(recorder, checks.error_parity(subject, case, scenario, subject_run, reference_run))


def _parity_of_input(subject, case, scenario, x, recorder):
    def subject_run():
        output = subject.build(case)(bridge.mlx_array(x, case.dtype) if x.dtype.kind == "f" else mx.array(x))
        mx.eval(output)
        return output

    def reference_run():
        layer = peft_layers.embedding(case) if hasattr(case, "ids") else peft_layers.linear(case)
        with torch.no_grad():
            return layer(peft_layers.tensor(x, case.dtype) if x.dtype.kind == "f" else torch.from_numpy(x))

    record_and_assert(recorder, checks.error_parity(subject, case, scenario, subject_run, reference_run))


@pytest.mark.family("linear")
@pytest.mark.parametrize("scenario", [*CONFIGURATIONS, "input one wider", "NaN input", "inf input"])
def test_linear(subject, dtype, scenario, recorder):
    """LoRA on a Linear: bad rank or dropout, a wrong input width, NaN and inf inputs."""
    _check(subject, _linear_case(dtype, use_dora=False), scenario, recorder)


@pytest.mark.family("dora_linear")
@pytest.mark.parametrize("scenario", [*CONFIGURATIONS, "input one wider", "NaN input", "inf input"])
def test_dora_linear(subject, dtype, scenario, recorder):
    """DoRA on a Linear: the same scenarios."""
    _check(subject, _linear_case(dtype, use_dora=True), scenario, recorder)


@pytest.mark.family("embedding")
@pytest.mark.parametrize("scenario", [*CONFIGURATIONS, "token id -1", "token id = vocabulary"])
def test_embedding(subject, dtype, scenario, recorder):
    """LoRA on an Embedding: bad rank or dropout, token ids outside the vocabulary."""
    case = make_embedding_case(6, 4, dtype=dtype, use_dora=False, **PARAMETERS)
    _check(subject, case, scenario, recorder)


def _check(subject, case, scenario, recorder):
    if scenario in CONFIGURATIONS:
        _parity_of_configuration(subject, case, scenario, recorder)
        return
    if hasattr(case, "ids"):
        vocabulary = case.lookup.in_features
        ids = case.ids.copy()
        ids[0] = -1 if scenario == "token id -1" else vocabulary
        _parity_of_input(subject, case, scenario, ids, recorder)
    else:
        _parity_of_input(subject, case, scenario, _linear_inputs(case)[scenario], recorder)
