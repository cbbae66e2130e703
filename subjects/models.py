"""The subject side of a whole model: mlx-lm's own entry points, as its users call them.

mlx-lm loads the directory transformers saved (`mlx_lm.utils.load_model`, which applies the architecture's
``sanitize``) and the adapters from a directory in mlx-lm's own format (``adapters.safetensors`` and
``adapter_config.json``) with `mlx_lm.tuner.utils.load_adapters`, which builds the LoRA layers
(`linear_to_lora_layers`) from that configuration, as ``mlx_lm.generate --adapter-path`` does.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from foundation.model_cases import ModelCase
from foundation.model_files import mlx_lm_adapter_directory, model_directory


def adapted(case: ModelCase) -> nn.Module:
    """mlx-lm's model of the case's directory, with the case's adapters loaded by mlx-lm, in eval mode."""
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(model_directory(case))
    load_adapters(model, str(mlx_lm_adapter_directory(case)))
    return model.eval()


def adapted_modules(model: nn.Module) -> set[str]:
    """The modules mlx-lm adapted (those holding ``lora_a``)."""
    return {name.removesuffix(".lora_a") for name, _ in tree_flatten(model.parameters()) if name.endswith(".lora_a")}


def logits(model: nn.Module, case: ModelCase) -> np.ndarray:
    return np.array(model(mx.array(case.tokens)).astype(mx.float32), dtype=np.float64)
