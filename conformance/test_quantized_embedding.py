"""LoRA on a quantized Embedding base (``nn.QuantizedEmbedding``), in every mode the installed MLX offers.

The table is quantized along its dims, as ``QuantizedEmbedding`` holds it; peft is given the
dequantized table. A tenth of the profile's examples per mode: the LoRA arithmetic is that of the
dense table (`test_embedding.py`); what is new here shows on any case.
"""

import pytest

from conformance import checks, family_tests
from conformance.asserting import record_and_assert
from foundation.cases import make_embedding_case
from foundation.quantization import KINDS, first_of_kind

globals().update(family_tests.module_tests("test_quantized_embedding.py"))

SCALAR_ID = dict(r=2, alpha=4.0, use_rslora=False, dropout=0.0, batch_shape=(), magnitudes=(1.0, 1.0, 1.0, 1.0), seed=3)


@pytest.mark.family("embedding")
@pytest.mark.check("forward_scalar_id")
@pytest.mark.parametrize("kind", KINDS)
def test_forward_of_one_token_id(subject, dtype, kind, recorder):
    """A single token id (a 0-d array) is looked up as ``nn.Embedding`` and peft look it up.

    Its own check, so that a failure here cannot hide the batched lookups above.
    """
    q = first_of_kind(kind)
    case = make_embedding_case(8, q.group_size, dtype=dtype, quantization=q, **SCALAR_ID)
    record_and_assert(recorder, checks.lookup(subject, case))
