"""The `steps` checks' training problem: a fixed regression target and the optimizers both sides run.

The loss is ``1/2 sum((y - Y)^2)`` for the case's input x and a fixed random target Y, so its
gradient with respect to the output is ``y - Y``. Learning rates are powers of two (exact in every
dtype), chosen from the case so that a step changes the adapter visibly but not wildly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from foundation.cases import LinearCase, draw_array

STEPS = 3
"""Optimizer steps per case; the adapter is compared after each."""


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer's hyper-parameters, identical on both sides (MLX's AdamW with ``bias_correction=True``,
    as torch's AdamW always corrects)."""

    kind: str
    """"sgd" or "adamw"."""
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01

    def describe(self) -> dict:
        if self.kind == "sgd":
            return {"optimizer": "sgd", "lr": self.lr}
        return {
            "optimizer": "adamw",
            "lr": self.lr,
            "betas": list(self.betas),
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }


def regression_target(case: LinearCase) -> np.ndarray:
    """Y, shaped like the output: what the steps fit the layer's output to."""
    rng = np.random.default_rng([case.seed, 4])
    return draw_array(rng, (*case.batch_shape, case.out_features), 1.0, case.dtype)


def _power_of_two(value: float) -> float:
    return 2.0 ** round(math.log2(value)) if value > 0 and math.isfinite(value) else 1.0


def _rms(values: np.ndarray) -> float:
    return float(np.sqrt(np.mean(values**2)))


def optimizer_for(case: LinearCase, kind: str, first_gradients: dict[str, np.ndarray]) -> OptimizerSpec:
    """SGD moving the adapter by about a tenth of its norm per step; AdamW (whose steps are about lr per
    element) by about a twentieth of the smaller of A's and B's typical entries."""
    if kind == "sgd":
        adapter = math.hypot(np.linalg.norm(case.lora_A), np.linalg.norm(case.lora_B))
        gradient = math.hypot(*(np.linalg.norm(g) for g in first_gradients.values()))
        return OptimizerSpec("sgd", _power_of_two(0.1 * adapter / gradient))
    if kind == "adamw":
        return OptimizerSpec("adamw", _power_of_two(0.05 * min(_rms(case.lora_A), _rms(case.lora_B))))
    raise ValueError(f"unknown optimizer {kind!r}: use 'sgd' or 'adamw'")
