"""A case's weights as `Tracked` values: what the oracle's formulas start from.

Each is exact in the case dtype (the case rounded it there), but a quantized base, which may be
dequantized on the fly without rounding to the dtype. The adapted weight ``W + s B A`` lives here too,
because whether a DoRA case can be judged at all depends on its row norms (`dora_norms_determined`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from foundation.memo import once_per_case
from foundation.verdict import Tracked

if TYPE_CHECKING:  # the cases are built on this module (their strategies keep only judgeable cases)
    from foundation.cases import LinearCase


def exact(case: LinearCase, array: np.ndarray) -> Tracked:
    """One of the case's base arrays (x, W, b, T): exact in the case dtype."""
    return Tracked.exact(array, case.dtype)


def adapter(case: LinearCase, array: np.ndarray) -> Tracked:
    """One of the case's adapter arrays (A, B, DoRA's m): exact in the adapter's dtype."""
    return Tracked.exact(array, case.adapter_dtype)


@once_per_case
def base_weight(case: LinearCase) -> Tracked:
    """The base weight; a quantized base may dequantize it on the fly without rounding to the dtype."""
    if case.quantization is None:
        return exact(case, case.weight)
    return Tracked.rounded(case.weight, case.dtype)


@once_per_case
def lora_delta(case: LinearCase) -> Tracked:
    """``s B A``: the adapter as a weight update, (out, in), in the adapter's dtype."""
    return adapter(case, case.lora_B).scaled_matmul(adapter(case, case.lora_A), case.scale)


@once_per_case
def adapted_sum(case: LinearCase) -> Tracked:
    """``W + s B A``, (out, in), in the finer of the base's and the adapter's dtypes: what DoRA normalises (MLX adds
    a float32 update to the weight without a cast, peft casts the weight to float32 first)."""
    return base_weight(case) + lora_delta(case)


@once_per_case
def adapted_weight(case: LinearCase) -> Tracked:
    """``W + s B A``, (out, in), in the base's dtype: LoRA's merged weight."""
    return base_weight(case).plus(lora_delta(case)) if case.mixed else adapted_sum(case)


def dora_norms_determined(case: LinearCase, merged_magnitudes: np.ndarray) -> bool:
    """Whether the case dtype determines DoRA's row norms of ``W + s B A`` (`merged_magnitudes` is
    ``|W| + s |B| |A|``).

    DoRA divides by them. Where W + s B A cancels to within a few roundings of its terms, or its
    elements sink into the subnormals (the bound on the norm reaches half of it), any result is as right
    as any other, and a check could not fail.
    """
    adapted = adapted_sum(case).row_norm()
    cancels = adapted.value < 16 * case.dtype.unit_roundoff * np.linalg.norm(merged_magnitudes, axis=1)
    return not bool(np.any(cancels | (2 * adapted.bound >= adapted.value)))
