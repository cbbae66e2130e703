"""The oracle: the LoRA and rsLoRA formulas evaluated in float64 from the case's own weights.

Each formula is spelled out in the evaluation order a straightforward implementation uses, on
`Tracked` values, so evaluating it yields both the exact result and the error that rounding in the
case dtype can explain (see `conformance.verdict`).
"""

from __future__ import annotations

import numpy as np

from conformance.cases import LinearCase
from conformance.verdict import Tracked


def _exact(case: LinearCase, array: np.ndarray) -> Tracked:
    return Tracked.exact(array, case.dtype)


def _affine(case: LinearCase, weight: Tracked) -> Tracked:
    out = _exact(case, case.x) @ weight.T
    return out + _exact(case, case.bias) if case.has_bias else out


def lora_delta(case: LinearCase) -> Tracked:
    """``s B A``: the adapter as a weight update, (out, in)."""
    return _exact(case, case.lora_B).scaled_matmul(_exact(case, case.lora_A), case.scale)


def linear_base(case: LinearCase) -> Tracked:
    """``x W^T + b``: the frozen base layer alone."""
    return _affine(case, _exact(case, case.weight))


def lora_update(case: LinearCase) -> Tracked:
    """``s (x A^T) B^T``: the LoRA term."""
    down = _exact(case, case.x) @ _exact(case, case.lora_A).T
    return down.scaled_matmul(_exact(case, case.lora_B).T, case.scale)


def linear_forward(case: LinearCase) -> Tracked:
    """``y = x W^T + b + s (x A^T) B^T`` (Hu et al. 2021; rsLoRA: s = alpha / sqrt(r))."""
    return linear_base(case) + lora_update(case)


def merged_weight(case: LinearCase) -> Tracked:
    """``W + s B A``, (out, in)."""
    return _exact(case, case.weight) + lora_delta(case)


def merged_forward(case: LinearCase) -> Tracked:
    """The merged layer's output ``x (W + s B A)^T + b``."""
    return _affine(case, merged_weight(case))
