"""LoRA on a quantized Embedding base (``nn.QuantizedEmbedding``), in every mode the installed MLX offers.

The table is quantized along its dims, as ``QuantizedEmbedding`` holds it; peft is given the
dequantized table. A tenth of the profile's examples per mode: the LoRA arithmetic is that of the
dense table (`test_embedding.py`); what is new here shows on any case.
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conformance import checks
from conformance.asserting import record_and_assert
from foundation import profiles
from foundation.cases import embedding_cases, make_embedding_case
from foundation.quantization import KINDS, first_of_kind

pytestmark = [pytest.mark.parametrize("kind", KINDS), pytest.mark.family("embedding")]
SCALAR_ID = dict(r=2, alpha=4.0, use_rslora=False, dropout=0.0, batch_shape=(), magnitudes=(1.0, 1.0, 1.0, 1.0), seed=3)


def _cases(dtype, kind):
    return embedding_cases(dtype, quantized=kind)


@profiles.fewer_examples(10)
@given(data=st.data())
def test_forward(subject, dtype, kind, data, recorder):
    """Lookups of batches of ids are ``W[ids] + s A^T[ids] B^T`` on the dequantized table, in the model's dtype."""
    case = data.draw(_cases(dtype, kind).filter(lambda case: case.ids.ndim > 0), label="case")
    record_and_assert(recorder, checks.lookup(subject, case))


@pytest.mark.check("forward_scalar_id")
def test_forward_of_one_token_id(subject, dtype, kind, recorder):
    """A single token id (a 0-d array) is looked up as ``nn.Embedding`` and peft look it up.

    Its own check, so that a failure here cannot hide the batched lookups above.
    """
    q = first_of_kind(kind)
    case = make_embedding_case(8, q.group_size, dtype=dtype, quantization=q, **SCALAR_ID)
    record_and_assert(recorder, checks.lookup(subject, case))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_as_linear(subject, dtype, kind, data, recorder):
    """The tied output head multiplies by the adapted dequantized table."""
    record_and_assert(recorder, checks.as_linear(subject, data.draw(_cases(dtype, kind), label="case")))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_merge(subject, dtype, kind, data, recorder):
    """``fuse(dequantize=True)`` gives the table ``W + s A^T B^T`` in the base dtype, as peft's merge does."""
    record_and_assert(recorder, checks.embedding_merge(subject, data.draw(_cases(dtype, kind), label="case")))


@profiles.fewer_examples(10)
@given(data=st.data())
def test_requantize(subject, dtype, kind, data, recorder):
    """``fuse()`` re-quantizes exactly that merge, in the base's mode, bit width and group size."""
    record_and_assert(recorder, checks.requantize(subject, data.draw(_cases(dtype, kind), label="case")))
