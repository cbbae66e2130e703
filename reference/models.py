"""The reference side of a whole model: transformers builds and saves it, peft adapts it (`get_peft_model`).

Both sides load the model transformers saved (`foundation.model_files`), each through its own loading path
(``from_pretrained`` here, mlx-lm's `load_model` with its ``sanitize`` there). The oracle is the same model and
adapters loaded in float64 (every weight of the case's dtype, and every float32 adapter entry, is exact there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers
from peft import get_peft_model

from foundation.memo import once_per_case
from foundation.model_cases import ModelCase
from foundation.model_files import model_directory
from subjects.config_bridge import mlx_module, peft_config, peft_module


def loaded(directory: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The model saved in `directory`, as transformers loads it in `dtype`, in eval mode."""
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


def adapted(case: ModelCase, dtype: torch.dtype, term_cast_first: bool = False) -> torch.nn.Module:
    """The saved model loaded in `dtype`, adapted by peft as the bridge maps mlx-lm's configuration, with the case's
    adapters, in eval mode. peft adds each float32 LoRA term to the base output in float32 and rounds the sum once;
    with `term_cast_first`, the term is rounded to `dtype` first and added there, as mlx-lm's LoRA layers do."""
    model = get_peft_model(loaded(model_directory(case), dtype), peft_config(case.lora, case.layers))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, (a, b) in case.adapters.items():
            module = modules[peft_module(path)]
            module.lora_A["default"].weight.copy_(torch.from_numpy(a))
            module.lora_B["default"].weight.copy_(torch.from_numpy(b))
            if term_cast_first:
                module.register_forward_hook(_term_cast_first)
    return model.eval()


def _term_cast_first(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    """A peft LoRA layer's output with its term rounded to the output's dtype before the addition."""
    (x,) = inputs
    down, up = module.lora_A["default"], module.lora_B["default"]
    term = up(down(x.to(down.weight.dtype))) * module.scaling["default"]
    return module.base_layer(x) + term.to(output.dtype)


def merged(case: ModelCase, dtype: torch.dtype) -> torch.nn.Module:
    """peft's ``merge_and_unload()`` of the adapted model: each weight plus its float32 update, rounded once."""
    return adapted(case, dtype).merge_and_unload()


def merged_update_first(case: ModelCase, dtype: torch.dtype) -> torch.nn.Module:
    """The merge in the other order a correct implementation may take (mlx-lm's ``fuse`` does): the update
    ``scale * B A`` rounded to the model's dtype first, then added in it."""
    model = loaded(model_directory(case), dtype)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, (a, b) in case.adapters.items():
            update = case.lora.scale * (torch.from_numpy(b) @ torch.from_numpy(a))
            weight = modules[path].weight
            weight.copy_(weight + update.to(dtype))
    return model


def adapted_modules(model: torch.nn.Module) -> set[str]:
    """The modules peft adapted, by mlx-lm's names."""
    return {mlx_module(name) for name, module in model.named_modules() if hasattr(module, "lora_A")}


def logits(model: torch.nn.Module, case: ModelCase) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(case.tokens)).logits.to(torch.float64).numpy()


ATTENTION = ("sdpa", "eager")
"""transformers' attention implementations, two orders of one formula: ``sdpa`` keeps the scores in float32 on the
CPU, ``eager`` (as MLX's attention on the CPU) stores them in the model's dtype before the softmax, which in a model
with large activations moves the logits by far more."""


def logits_in_each_attention(model: torch.nn.Module, case: ModelCase) -> list[np.ndarray]:
    """The logits with each of `ATTENTION`'s implementations."""
    found = []
    for attention in ATTENTION:
        model.set_attn_implementation(attention)
        found.append(logits(model, case))
    return found


@once_per_case
def _oracle(case: ModelCase) -> tuple[np.ndarray, float]:
    """The adapted model in float64: its logits, and the largest magnitude any of its modules takes or gives."""
    model = adapted(case, torch.float64)
    largest = [0.0]

    def record(module: torch.nn.Module, inputs: tuple, output) -> None:
        for value in (*inputs, *(output if isinstance(output, tuple) else (output,))):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel():
                largest[0] = max(largest[0], float(value.detach().abs().max()))

    hooks = [module.register_forward_hook(record) for module in model.modules()]
    found = logits(model, case)
    for hook in hooks:
        hook.remove()
    return found, largest[0]


def oracle_logits(case: ModelCase) -> np.ndarray:
    """The adapted model's logits in float64: what every side's rounding is measured from."""
    return _oracle(case)[0]


def oracle_largest(case: ModelCase) -> float:
    """The largest magnitude any module of the float64 model takes or gives on the case's tokens."""
    return _oracle(case)[1]


@once_per_case
def base_logits(case: ModelCase) -> np.ndarray:
    """The model's logits without adapters, in float64: the oracle's less its adapters' contribution."""
    return logits(loaded(model_directory(case), torch.float64), case)


def trained(
    case: ModelCase,
    dtype: torch.dtype,
    steps: int,
    learning_rate: float,
    term_cast_first: bool = False,
    attention: str = "sdpa",
    loss_in_dtype: bool = False,
) -> tuple[list[float], dict[str, np.ndarray]]:
    """`steps` steps of torch's SGD on peft's adapted model (its base frozen by `get_peft_model`), the mean
    cross-entropy of each next token, as transformers computes it from float32 logits (or, `loss_in_dtype`, from the
    logits in the model's dtype, as mlx-lm does); the losses, and the trainable parameters after the steps by
    mlx-lm's names and layouts (``...q_proj.lora_a`` (in, r))."""
    model = adapted(case, dtype, term_cast_first)
    model.set_attn_implementation(attention)
    model.train()
    trainable = {mlx_module(name): p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(list(trainable.values()), lr=learning_rate)
    tokens = torch.from_numpy(case.tokens)
    losses = []
    for _ in range(steps):
        logits = model(tokens[:, :-1]).logits
        logits = logits if loss_in_dtype else logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    return losses, {_mlx_parameter(name): _mlx_layout(name, p) for name, p in trainable.items()}


def _mlx_parameter(name: str) -> str:
    """mlx-lm's name of peft's adapter parameter (``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_a``)."""
    for peft_name, mlx_name in ((".lora_A.default.weight", ".lora_a"), (".lora_B.default.weight", ".lora_b")):
        if name.endswith(peft_name):
            return name.removesuffix(peft_name) + mlx_name
    return name


def _mlx_layout(name: str, parameter: torch.Tensor) -> np.ndarray:
    """An adapter factor in mlx-lm's layout: peft's A (r, in) and B (out, r), transposed."""
    values = parameter.detach().to(torch.float64).numpy()
    return values.T if ".lora_" in name else values
