"""Does a layer's own dropout keep the output's expectation? A test with a false-alarm bound.

peft's LoRA drops the adapter's input and rescales what it keeps by ``1 / (1 - p)`` (inverted
dropout), so the mean training-mode output is the eval-mode output. With K training-mode outputs
``y_k`` of the same input, eval output ``y`` and the LoRA term ``L = s (x A^T) B^T``, the statistic

    S = sum_k sum L * (y_k - y)

is a sum of independent terms ``(m / (1 - p) - 1) g`` over the masks' elements, with
``g = x * (L c^T)`` and ``c = s A^T B^T`` (in, out): each has mean 0, variance ``p / (1 - p) g^2`` and
size at most ``max(1, p / (1 - p)) |g|``. Bernstein's inequality bounds ``|S|`` by `statistical_limit`
except with probability `FALSE_ALARM`; rounding adds at most ``sum_k sum |L| (e_k + e)``, bounded by
the oracle. Dropout that forgets the rescaling gives ``S = -K p sum L^2`` on average instead.

The variance assumes peft's placement (the LoRA input); the placement itself is the ``dropout``
check's to judge.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from foundation.cases import LinearCase
from foundation.verdict import CALIBRATION, Comparison, Tracked
from reference import oracle

SAMPLES = 1024
"""Training-mode outputs per case (one call on the input repeated along a new leading axis)."""
FALSE_ALARM = 1e-9
"""The probability that a correct layer's statistic exceeds its statistical limit, per case."""


def _terms(case: LinearCase) -> np.ndarray:
    """g, (N, in): what dropping or keeping each input element adds to S."""
    x = case.x.reshape(-1, case.in_features)
    lora = oracle.lora_update(case).value.reshape(-1, case.out_features)
    c = case.scale * case.lora_A.T @ case.lora_B.T
    return x * (lora @ c.T)


def statistical_limit(case: LinearCase, samples: int = SAMPLES) -> float:
    """Bernstein's bound on ``|S|`` for a correct layer, exceeded with probability at most `FALSE_ALARM`."""
    p, g = case.dropout, _terms(case)
    variance = samples * p / (1 - p) * float(np.sum(g**2))
    size = max(1.0, p / (1 - p)) * float(np.max(np.abs(g), initial=0.0))
    log = math.log(2 / FALSE_ALARM)
    return log * size / 3 + math.sqrt((log * size / 3) ** 2 + 2 * log * variance)


def rounding_limit(case: LinearCase, samples: int = SAMPLES) -> float:
    """What rounding can add to ``|S|``: each training output's bound is at most that of the same formula on
    the magnitudes of every input, with the whole input kept and rescaled (dropping only lowers it)."""
    magnitudes = replace(
        case,
        x=np.abs(case.x),
        weight=np.abs(case.weight),
        lora_A=np.abs(case.lora_A),
        lora_B=np.abs(case.lora_B),
        bias=None if case.bias is None else np.abs(case.bias),
    )
    kept = Tracked.exact(np.abs(case.x), case.dtype).scaled(1 / (1 - case.dropout))
    training = oracle.linear_forward(magnitudes, kept).bound
    evaluation = oracle.linear_forward(case).bound
    weight = np.abs(oracle.lora_update(case).value)
    return CALIBRATION * float(np.sum(weight * (samples * training + samples * evaluation)))


def judge(case: LinearCase, training: np.ndarray, evaluation: np.ndarray) -> tuple[Comparison, float]:
    """The comparison of S (from K training outputs (K, *batch, out) and the eval output) with its limit,
    and the ratio of the training-mode LoRA term's mean to the eval-mode one that S implies."""
    lora = oracle.lora_update(case).value
    statistic = float(np.sum(lora * (training - evaluation)))
    limit = statistical_limit(case, len(training)) + rounding_limit(case, len(training))
    comparison = Comparison(
        "mean training output, weighted by the LoRA term",
        "subject",
        margin=abs(statistic) / limit if limit else (math.inf if statistic else 0.0),
        max_error=abs(statistic),
        allowed_at_worst=limit,
        observed_at_worst=statistic,
        expected_at_worst=0.0,
    )
    energy = float(np.sum(lora**2)) * len(training)
    return comparison, 1 + statistic / energy if energy else math.nan
