"""peft's LoRA layers built directly around a torch base layer (no PeftModel), holding a case's weights."""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear

from conformance.cases import LinearCase
from conformance.dtypes import DType

ADAPTER = "default"


def tensor(values: np.ndarray, dtype: DType) -> torch.Tensor:
    """A torch tensor holding `values` exactly (they are representable in `dtype` by construction)."""
    return torch.from_numpy(np.asarray(values, dtype=np.float32)).to(dtype.torch)


def to_numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().to(torch.float64).numpy()


def dtype_name(values: torch.Tensor) -> str:
    return str(values.dtype).removeprefix("torch.")


def linear(case: LinearCase) -> LoraLinear:
    """peft's LoRA ``Linear`` for the case, in eval mode."""
    base = torch.nn.Linear(case.in_features, case.out_features, bias=case.has_bias, dtype=case.dtype.torch)
    config = LoraConfig(
        r=case.r, lora_alpha=case.alpha, use_rslora=case.use_rslora, lora_dropout=case.dropout
    )
    layer = LoraLinear(base, ADAPTER, config=config, r=case.r, lora_alpha=case.alpha)
    with torch.no_grad():
        base.weight.copy_(tensor(case.weight, case.dtype))
        if case.has_bias:
            base.bias.copy_(tensor(case.bias, case.dtype))
        layer.lora_A[ADAPTER].weight.copy_(tensor(case.lora_A, case.dtype))
        layer.lora_B[ADAPTER].weight.copy_(tensor(case.lora_B, case.dtype))
    return layer.eval()


def forward(layer: torch.nn.Module, case: LinearCase) -> torch.Tensor:
    with torch.no_grad():
        return layer(tensor(case.x, case.dtype))
