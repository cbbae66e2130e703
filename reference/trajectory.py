"""The oracle's optimizer steps: LoRA's A and B after each SGD or AdamW step on the regression problem of
`foundation.optimizers`, in float64, with the error that rounding in the case dtype can accumulate.

Each step is the float64 formula on `Tracked` values, so a step's bound carries the previous steps'
errors through the forward pass, the gradient and the update. AdamW divides by ``sqrt(v) + eps``,
which is ill-conditioned where a gradient is within its own rounding error of zero; there the bound
would be unbounded, so it is capped at what any AdamW step can move an element by (see `_adam_step_limit`).
"""

from __future__ import annotations

import math

import numpy as np

from foundation.cases import LinearCase
from foundation.optimizers import OptimizerSpec
from foundation.verdict import Tracked, gamma
from foundation.weights import adapter
from reference.oracle import linear_base, lora_backward


def _gradients(case: LinearCase, held: dict[str, Tracked], target: np.ndarray) -> dict[str, Tracked]:
    """dA and dB of ``1/2 sum((y - Y)^2)``, whose output gradient is ``y - Y``; a float32 adapter's term is added
    to the base's output in its dtype (`Tracked.plus`)."""
    x = Tracked.exact(case.x.reshape(-1, case.in_features), case.dtype)
    a, b = held["A"], held["B"]
    base = linear_base(case)
    y = base.reshape(-1, case.out_features).plus((x @ a.T).scaled_matmul(b.T, case.scale))
    residual = y - Tracked.exact(target.reshape(-1, case.out_features), case.dtype)
    grads = lora_backward(x, residual, a, b, case.scale)
    return {"A": grads["A"], "B": grads["B"]}


def first_gradients(case: LinearCase, target: np.ndarray) -> dict[str, np.ndarray]:
    """The gradients at the case's own adapter, as values (to choose a learning rate from)."""
    start = {"A": adapter(case, case.lora_A), "B": adapter(case, case.lora_B)}
    return {name: g.value for name, g in _gradients(case, start, target).items()}


def _adam_step_limit(spec: OptimizerSpec, step: int) -> float:
    """The most an AdamW step can move an element, whatever the gradients: by Cauchy-Schwarz,
    ``|m_hat| / sqrt(v_hat) <= (1 - b1) / (1 - b1^t) * sqrt((1 - b2^t) / (1 - b2) * sum_{j<t} (b1^2 / b2)^j)``."""
    b1, b2 = spec.betas
    history = sum((b1 * b1 / b2) ** j for j in range(step))
    return spec.lr * (1 - b1) / (1 - b1**step) * math.sqrt((1 - b2**step) / (1 - b2) * history)


def _rounded(value: float, case: LinearCase) -> Tracked:
    """A Python float as an optimizer may hold it: rounded to the adapter's dtype."""
    dtype = case.adapter_dtype
    return Tracked(np.asarray(value), np.asarray(dtype.unit_roundoff * abs(value)), dtype)


def _bias_corrections(spec: OptimizerSpec, step: int, case: LinearCase) -> tuple[Tracked, Tracked]:
    """``lr / (1 - b1^t)`` and ``1 / sqrt(1 - b2^t)``. MLX evaluates them in the adapter's dtype from b1 and b2
    rounded to it; ``1 - b^t`` then cancels (b2 = 0.999 in float32 is off by 1.3e-8, 1 - b2 by 1.3e-5
    relatively), which the bound carries. torch evaluates them in float64: within the bound."""
    one = Tracked.exact(np.asarray(1.0), case.adapter_dtype)
    powers = []
    for beta in spec.betas:
        power = _rounded(beta, case)
        for _ in range(step - 1):
            power = power * _rounded(beta, case)
        powers.append(one - power)
    return _rounded(spec.lr, case) / powers[0], one / powers[1].sqrt()


def steps(
    case: LinearCase, spec: OptimizerSpec, target: np.ndarray, count: int, largest: list[float] | None = None
) -> list[dict[str, Tracked]]:
    """A and B (peft's layouts) after each of `count` steps; `largest`, if given, gets the largest
    magnitude of what an implementation holds in the dtype: gradients (AdamW: their squares) and the adapter.
    The adapter, its gradients and the optimizer's state are held in the adapter's dtype (float32 adapters on a
    half-precision base, as both packages train them)."""
    held = {"A": adapter(case, case.lora_A), "B": adapter(case, case.lora_B)}
    zeros = {name: Tracked.exact(np.zeros_like(p.value), case.adapter_dtype) for name, p in held.items()}
    moments, squares = dict(zeros), dict(zeros)
    trajectory = []
    for step in range(1, count + 1):
        grads = _gradients(case, held, target)
        for name, g in grads.items():
            if largest is not None:
                largest.append(float(np.max(g.magnitude, initial=0.0)) ** (2 if spec.kind == "adamw" else 1))
            if spec.kind == "sgd":
                held[name] = held[name] - g.scaled(spec.lr)
                continue
            b1, b2 = spec.betas
            # MLX: b m + (1 - b) g; torch: m.lerp_(g, 1 - b) = m + (1 - b)(g - m), and v b + (1 - b) g g.
            m, v = moments[name], squares[name]
            moments[name] = Tracked.covering(m.scaled(b1) + g.scaled(1 - b1), m + (g - m).scaled(1 - b1))
            squares[name] = v.scaled(b2) + (g * g).scaled(1 - b2)
            first, second = _bias_corrections(spec, step, case)
            numerator = moments[name] * first
            denominator = (squares[name].sqrt() * second).shifted(spec.eps)
            update = numerator / denominator
            limit = _adam_step_limit(spec, step) * (2 + gamma(8, case.adapter_dtype))
            update = Tracked(update.value, np.minimum(update.bound, limit), case.adapter_dtype)
            held[name] = held[name].scaled(1 - spec.lr * spec.weight_decay) - update
        if largest is not None:
            largest += [float(np.max(p.magnitude, initial=0.0)) for p in held.values()]
        trajectory.append(dict(held))
    return trajectory
