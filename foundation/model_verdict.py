"""The verdict for whole models: the subject's error against the float64 model, held to the reference's own.

A layer's allowed error is carried through its formula step by step (`foundation.verdict`). A whole model's is not:
its attention, norms, rotary embeddings and activations are the packages' own kernels, in orders the suite does not
spell out. So, as PyTorch's decomposition tests judge a decomposition against the operator it replaces, the float64
model (the same weights and adapters, exact in float64) is the oracle, and the reference implementation (transformers
and peft, in the case's dtype) is the yardstick: its error against the oracle is what rounding in that dtype costs a
correct implementation of this very model and input. Where correct implementations round in different orders (a
merge that adds the float32 update and rounds once, as peft does, or rounds the update first, as mlx-lm does), the
reference is evaluated in each, and the larger error is the yardstick: in a model whose layers amplify errors, one
rounding more per weight may cost twenty times the error at the logits. The subject's error may be `MARGIN` times
that, or `MARGIN` roundings of the result where the references happen to err less than one.

Errors are root-mean-square over all logits: a wrong scale, a layer without its adapter, a transposed adapter or
an adapter on the wrong layers moves every logit after the layer it affects, and the mean over many logits is far
steadier than any one of them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from foundation.dtypes import DType
from foundation.verdict import WHOLE, Comparison

MARGIN = 4.0
"""How many times the reference's error the subject's may be. Measured, not derived: two implementations' rounding
errors in one dtype differ by their orders of evaluation (`verdict.CALIBRATION`, 2, for each step), and a realised
error may fall below its expectation; the false-alarm study (`studies.model_verdict`, docs/model-verdict.md) measures
the ratio on correct configurations and publishes its distribution against this margin."""


def rms(values: np.ndarray) -> float:
    """The root-mean-square of `values` (0 for none)."""
    return float(np.sqrt(np.mean(np.square(values)))) if values.size else 0.0


def allowed_error(
    references: Sequence[np.ndarray], oracle: np.ndarray, dtype: DType, largest: float = 0.0
) -> tuple[float, float, float]:
    """What the subject's RMS error may be: `MARGIN` times the larger of the references' largest RMS error (the
    reference in each order a correct implementation may take) and one rounding of the largest value the model
    computes on the way (``u * max(largest, rms(oracle))``); and those two. The second is a floor: a realised error
    may be far below its expectation, most where a tiny float32 model has few values to err in (the float32 study
    met correct cases at 4.5 to 6.5 times the reference's error)."""
    errors = [rms(reference - oracle) if np.all(np.isfinite(reference)) else math.inf for reference in references]
    reference_error = max(errors)
    one_rounding = dtype.unit_roundoff * max(largest, rms(oracle))
    return MARGIN * max(reference_error, one_rounding), reference_error, one_rounding


def compare_whole(
    quantity: str,
    observed: np.ndarray,
    references: Sequence[np.ndarray],
    oracle: np.ndarray,
    dtype: DType,
    largest: float = 0.0,
) -> Comparison:
    """Judge the subject's `observed` values of `quantity` as a whole: their RMS error against the `oracle`'s,
    against `allowed_error`."""
    comparison = Comparison(quantity, "subject", kind=WHOLE)
    if observed.shape != oracle.shape:
        comparison.problem = f"shape is {observed.shape}, but should be {oracle.shape}"
        comparison.kind = "shape"
        return comparison
    allowed, reference_error, one_rounding = allowed_error(references, oracle, dtype, largest)
    with np.errstate(invalid="ignore", over="ignore"):
        error = np.abs(observed - oracle)
    finite = np.isfinite(error)
    comparison.non_finite = int(np.count_nonzero(~finite))
    comparison.max_error = rms(error) if finite.all() else math.inf
    comparison.allowed_at_worst = allowed
    comparison.margin = comparison.max_error / allowed if allowed > 0 else (math.inf if comparison.max_error else 0.0)
    if observed.size:
        worst = int(np.where(finite, error, np.inf).argmax())
        comparison.worst_index = tuple(int(i) for i in np.unravel_index(worst, error.shape))
        comparison.observed_at_worst = float(observed.flat[worst])
        comparison.expected_at_worst = float(oracle.flat[worst])
    verdict = "within" if comparison.margin <= 1 else "but should be at most"
    comparison.detail = (
        f"RMS error {comparison.max_error:.3g} against the float64 model, {verdict} {MARGIN:g} x "
        f"max(the reference's {reference_error:.3g}, one rounding's {one_rounding:.3g}) = {allowed:.3g} "
        f"(margin {comparison.margin:.3g})"
    )
    return comparison
