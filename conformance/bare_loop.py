"""The forward and merge checks' work done plainly: what the same-case benchmark holds the suite against.

For one linear case: peft's and MLX's layers, each built once with the case's weights, run forward,
merged and run merged; the oracle's formulas in float64 with their allowed error (the verdict's own
arithmetic, which the suite may not skip); one vectorized comparison per result. No measurement
objects, no worst-element report, no diagnosis, no recording: the least a harness of these two
checks could do without weakening their verdict.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from conformance.timing import PhaseTimer
from foundation.cases import LinearCase
from foundation.verdict import Tracked, allowed_error
from reference import oracle
from subjects.known import Subject


def _peft(case: LinearCase) -> list[np.ndarray]:
    dtype = case.dtype.torch
    base = torch.nn.Linear(case.in_features, case.out_features, bias=case.has_bias, dtype=dtype)
    config = LoraConfig(r=case.r, lora_alpha=case.alpha, use_rslora=case.use_rslora, lora_dropout=case.dropout)
    layer = LoraLinear(base, "default", config=config, r=case.r, lora_alpha=case.alpha)

    def tensor(values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values.astype(np.float32)).to(dtype)

    x = tensor(case.x)
    with torch.no_grad():
        base.weight.copy_(tensor(case.weight))
        if case.has_bias:
            base.bias.copy_(tensor(case.bias))
        layer.lora_A["default"].weight.copy_(tensor(case.lora_A))
        layer.lora_B["default"].weight.copy_(tensor(case.lora_B))
        layer.eval()
        output = layer(x)
        layer.merge()
        merged_output = layer(x)
    return [t.detach().to(torch.float64).numpy() for t in (output, base.weight, merged_output)]


def _mlx(subject: Subject, case: LinearCase) -> list[np.ndarray]:
    dtype = getattr(mx, case.dtype.name)

    def array(values: np.ndarray) -> mx.array:
        return mx.array(values.astype(np.float32)).astype(dtype)

    base = nn.Linear(case.in_features, case.out_features, bias=case.has_bias)
    base.weight = array(case.weight)
    if case.has_bias:
        base.bias = array(case.bias)
    base.freeze()
    layer = subject.implementation.from_base(base, r=case.r, dropout=case.dropout, scale=case.scale)
    layer.lora_a, layer.lora_b = array(case.lora_A.T), array(case.lora_B.T)
    layer.eval()
    x = array(case.x)
    output = layer(x)
    merged = layer.fuse()
    merged_output = merged(x)
    mx.eval(output, merged.weight, merged_output)
    return [np.array(a.astype(mx.float32), dtype=np.float64) for a in (output, merged.weight, merged_output)]


def _formula(case: LinearCase) -> list[Tracked]:
    return [oracle.linear_forward(case), oracle.merged_weight(case), oracle.merged_forward(case)]


def run(subject: Subject, case: LinearCase, timer: PhaseTimer) -> bool:
    """The case's forward and merge work; whether both sides stay within the allowed error.

    Give it a case object no check has seen (`dataclasses.replace`): the oracle keeps what it computes with a case.
    """
    with timer("reference"):
        reference = _peft(case)
    with timer("subject"):
        observed = _mlx(subject, case)
    with timer("oracle"):
        expected = _formula(case)
        return all(
            bool(np.all(np.abs(got - want.value) <= allowed_error(want)))
            for side in (reference, observed)
            for got, want in zip(side, expected)
        )
