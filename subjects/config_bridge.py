"""mlx-lm's LoRA configuration as peft's: what the same adapters mean on both sides of a whole model.

mlx-lm (``adapter_config.json``: ``fine_tune_type``, ``num_layers``, ``lora_parameters`` with ``rank``, ``scale``,
``dropout`` and ``keys``) adapts the layers named by ``keys`` (paths in a block; by default every linear layer) of
the last ``num_layers`` blocks, and scales the LoRA term by ``scale``. peft's `LoraConfig` says the same with
``target_modules`` (matched against the end of a module's name), ``layers_to_transform`` (block indices) and
``lora_alpha`` (the term is scaled by ``lora_alpha / r``, so ``lora_alpha = scale * rank``).
"""

from __future__ import annotations

from peft import LoraConfig

from foundation.model_cases import LoraSettings


def peft_config(lora: LoraSettings, layers: int) -> LoraConfig:
    """peft's configuration of the adapters mlx-lm's `lora` puts on a model of `layers` blocks."""
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.scale * lora.rank,
        lora_dropout=lora.dropout,
        target_modules=list(lora.adapted_keys),
        layers_to_transform=list(range(max(layers - lora.num_layers, 0), layers)),
        use_dora=lora.fine_tune_type == "dora",
    )


PEFT_PREFIX = "base_model.model."
"""What peft's `get_peft_model` puts before a module's name in the model it wraps."""


def peft_module(mlx_path: str) -> str:
    """peft's name of the module mlx-lm names `mlx_path` (``model.layers.0.self_attn.q_proj``)."""
    return PEFT_PREFIX + mlx_path


def mlx_module(peft_path: str) -> str:
    """mlx-lm's name of the module peft names `peft_path`."""
    return peft_path.removeprefix(PEFT_PREFIX)
