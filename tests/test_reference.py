"""What the reference side works around in peft, pinned down so that a peft fix is noticed."""

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import ParamWrapper

from foundation.cases import make_linear_case
from foundation.dtypes import FLOAT32
from foundation.switch_cases import make_switch_case
from reference import peft_layers


def _case(batch_shape, use_dora):
    return make_linear_case(
        dtype=FLOAT32,
        in_features=3,
        out_features=2,
        r=2,
        alpha=4.0,
        use_rslora=False,
        dropout=0.0,
        batch_shape=batch_shape,
        has_bias=True,
        magnitudes=(1.0, 1.0, 1.0, 1.0),
        seed=0,
        use_dora=use_dora,
    )


def test_peft_dora_turns_an_unbatched_input_into_a_batch_of_one():
    """If this fails, peft fixed it: drop the batch-of-one workaround in `peft_layers.forward`."""
    case = _case((), use_dora=True)
    layer = peft_layers.linear(case)
    with torch.no_grad():
        assert layer(peft_layers.tensor(case.x, case.dtype)).shape == (1, 2)
    assert peft_layers.forward(layer, case).shape == (2,)


def test_workaround_gives_the_batched_result():
    unbatched, batched = _case((), use_dora=True), _case((1,), use_dora=True)
    assert np.array_equal(unbatched.x, batched.x[0])
    one = peft_layers.forward(peft_layers.linear(unbatched), unbatched)
    assert torch.equal(one, peft_layers.forward(peft_layers.linear(batched), batched)[0])


def test_peft_target_parameters_adapts_each_expert_as_its_own_linear_would():
    """The layouts `peft_layers.switch` gives peft's expert adapter (A expert-major, B expert-minor) are the
    ones peft reads: its routed outputs are those of one peft ``Linear`` per expert."""
    case = make_switch_case(
        3,
        2,
        False,
        seed=1,
        dtype=FLOAT32,
        in_features=4,
        out_features=5,
        r=2,
        alpha=3.0,
        use_rslora=False,
        dropout=0.0,
        batch_shape=(2, 3),
        has_bias=True,
        magnitudes=(1.0, 1.0, 1.0, 1.0),
    )
    wrapped = peft_layers.switch(case)
    assert isinstance(wrapped, ParamWrapper)
    expected = peft_layers.switch_forward(
        peft_layers.PerExpertLinears([peft_layers.linear(e) for e in case.experts]), case
    )
    torch.testing.assert_close(peft_layers.switch_forward(wrapped, case), expected)


def test_peft_target_parameters_refuses_dropout():
    """If this fails, peft accepts dropout on expert parameters: `peft_layers.switch` need not fall back."""
    case = make_switch_case(
        2,
        1,
        False,
        seed=1,
        dtype=FLOAT32,
        in_features=4,
        out_features=5,
        r=2,
        alpha=3.0,
        use_rslora=False,
        dropout=0.1,
        batch_shape=(2,),
        has_bias=False,
        magnitudes=(1.0, 1.0, 1.0, 1.0),
    )
    base = peft_layers.Experts(peft_layers.tensor(case.stacked("weight"), FLOAT32), None)
    with pytest.raises(ValueError, match="lora_dropout"):
        ParamWrapper(base, "default", parameter_name="weight", config=LoraConfig(r=2, lora_dropout=0.1), r=2)
    assert isinstance(peft_layers.switch(case), peft_layers.PerExpertLinears)
