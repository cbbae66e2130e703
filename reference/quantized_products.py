"""A quantized base's products as MLX computes them on the CPU in half precision: ``x W^T`` summed term by term in the
model's dtype, each product and each partial sum rounded there: bit for bit MLX's affine kernel in bfloat16, whose
RMS error on random data is 9.0e-3, 1.3e-2 and 1.8e-2 relative for 64, 128 and 256 terms where a float32 sum's is
1.6e-3 (the mx kernels sum in another order, and err less). peft's model on the values the quantized weights hold
sums in float32; this module gives it MLX's order, for the forward pass and the input's gradient (the base is
frozen), as one of the orders QLoRA's reference takes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from foundation.model_cases import ModelCase
from foundation.model_files import mlx_directory, mlx_weights
from subjects.config_bridge import mlx_module


def summed_in_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x W^T`` (`weight` (out, in)) accumulated over the inner axis in `x`'s dtype, one term at a time."""
    total = torch.zeros((*x.shape[:-1], weight.shape[0]), dtype=x.dtype)
    for k in range(x.shape[-1]):
        total = total + x[..., k, None] * weight[:, k]
    return total


class _ProductInDtype(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        return summed_in_dtype(x, weight)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return summed_in_dtype(upstream, weight.T), None


def quantized_paths(case: ModelCase) -> set[str]:
    """The layers MLX's copy of the model holds quantized, by path (``model.layers.0.self_attn.q_proj``); a tied
    output layer among them where the embedding is (MLX's logits are then the quantized embedding's ``as_linear``)."""
    paths = {name.removesuffix(".scales") for name in mlx_weights(mlx_directory(case)) if name.endswith(".scales")}
    if case.tied and "model.embed_tokens" in paths:
        paths.add("lm_head")
    return paths


@contextlib.contextmanager
def products_in_dtype(model: torch.nn.Module, case: ModelCase) -> Iterator[None]:
    """While in the context, every linear layer of peft's `model` that MLX holds quantized computes its product
    summed in the model's dtype (`summed_in_dtype`), the input's gradient too."""
    paths = quantized_paths(case)

    def product(module: torch.nn.Linear, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        found = _ProductInDtype.apply(inputs[0], module.weight)
        return found if module.bias is None else found + module.bias

    hooks = [
        module.register_forward_hook(product)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and mlx_module(name).removesuffix(".base_layer") in paths
    ]
    if paths and not hooks:
        raise LookupError(f"none of peft's layers is one MLX quantized ({', '.join(sorted(paths))})")
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
