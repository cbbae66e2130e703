"""The reference side of a whole model: transformers builds and saves it, peft adapts it (`get_peft_model`).

Both sides load the model transformers saved (`foundation.model_files`), each through its own loading path
(``from_pretrained`` here, mlx-lm's `load_model` with its ``sanitize`` there). The oracle is the same model and
adapters loaded in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers
from peft import get_peft_model

from foundation.model_cases import ModelCase
from foundation.model_files import model_directory
from subjects.config_bridge import mlx_module, peft_config, peft_module


def adapted(case: ModelCase, dtype: torch.dtype) -> torch.nn.Module:
    """The saved model loaded in `dtype`, adapted by peft as the bridge maps mlx-lm's configuration, with the case's
    adapters, in eval mode."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_directory(case), dtype=dtype)
    model = get_peft_model(model, peft_config(case.lora, case.layers))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, (a, b) in case.adapters.items():
            module = modules[peft_module(path)]
            module.lora_A["default"].weight.copy_(torch.from_numpy(a))
            module.lora_B["default"].weight.copy_(torch.from_numpy(b))
    return model.eval()


def adapted_modules(model: torch.nn.Module) -> set[str]:
    """The modules peft adapted, by mlx-lm's names."""
    return {mlx_module(name) for name, module in model.named_modules() if hasattr(module, "lora_A")}


def logits(model: torch.nn.Module, case: ModelCase) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(case.tokens)).logits.to(torch.float64).numpy()
