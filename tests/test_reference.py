"""What the reference side works around in peft, pinned down so that a peft fix is noticed."""

import numpy as np
import torch

from conformance.cases import make_linear_case
from conformance.dtypes import FLOAT32
from reference import peft_layers


def _case(batch_shape, use_dora):
    return make_linear_case(
        dtype=FLOAT32, in_features=3, out_features=2, r=2, alpha=4.0, use_rslora=False, dropout=0.0,
        batch_shape=batch_shape, has_bias=True, magnitudes=(1.0, 1.0, 1.0, 1.0), seed=0, use_dora=use_dora,
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
