"""The bridge: the one place that knows how MLX's LoRA conventions differ from peft's.

peft keeps ``lora_A.weight`` as (r, in) and ``lora_B.weight`` as (out, r) and derives
``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA). MLX keeps the transposes, (in, r) and (r, out),
and its layers take either the scale itself (``LoRALinear.from_base(..., scale=)``) or a raw alpha
that they divide by the rank (mlx-vlm's legacy ``LoRaLayer``). A `Convention` turns a case into a
subject layer with bit-identical weights, in eval mode, and merges it the way its package does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optimizers
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from foundation import quantization
from foundation.cases import EmbeddingCase, LinearCase
from foundation.dtypes import FLOAT32, DType
from foundation.memo import once_per_case
from foundation.optimizers import OptimizerSpec
from foundation.switch_cases import SwitchCase


def mlx_array(values: np.ndarray, dtype: DType) -> mx.array:
    """An MLX array holding `values` exactly (they are representable in `dtype` by construction)."""
    return mx.array(np.asarray(values, dtype=np.float32)).astype(getattr(mx, dtype.name))


@once_per_case
def input_of(case: LinearCase | SwitchCase) -> mx.array:
    """The case's input x as an MLX array, made once for every check that calls a layer on it (MLX arrays are
    immutable, so they can share it)."""
    return mlx_array(case.x, case.dtype)


def to_numpy(values: mx.array) -> np.ndarray:
    """The values as float64, exactly, through float32 (NumPy has no bfloat16, and MLX's cast quiets a NaN that
    NumPy's float16 conversion would keep signalling)."""
    return all_to_numpy({"values": values})["values"]


def all_to_numpy(arrays: dict[str, mx.array]) -> dict[str, np.ndarray]:
    """`to_numpy` of several arrays, evaluated together: one MLX evaluation (each costs a hand-over to MLX's
    stream thread) instead of one per array and cast."""
    readable = {name: a if a.dtype == mx.float32 else a.astype(mx.float32) for name, a in arrays.items()}
    mx.eval(*readable.values())
    return {name: np.array(values, dtype=np.float64) for name, values in readable.items()}


def dtype_name(values: mx.array) -> str:
    return str(values.dtype).removeprefix("mlx.core.")


def base_linear(case: LinearCase) -> nn.Linear | nn.QuantizedLinear:
    """The frozen MLX ``nn.Linear`` (or ``nn.QuantizedLinear``) with the case's weight and bias."""
    q = case.quantization
    if q is None:
        linear = nn.Linear(case.in_features, case.out_features, bias=case.has_bias)
        linear.weight = mlx_array(case.weight, case.dtype)
    else:
        linear = nn.QuantizedLinear(case.in_features, case.out_features, case.has_bias, q.group_size, q.bits, q.mode)
        linear.weight, linear.scales, *biases = quantization.to_mlx(case.quantized_parts, case.dtype)
        linear.biases = biases[0] if biases else None
    if case.has_bias:
        linear.bias = mlx_array(case.bias, case.dtype)
    linear.freeze()  # as the packages' training paths leave a base before they attach an adapter (all bases here)
    return linear


class Convention(Protocol):
    """How one family of MLX classes is built from a case and merged."""

    roles: dict[str, str]
    """The layer's adapter parameters by name -> the role ("A", "B") they play in peft's layouts."""

    def construct(self, cls: type, case: LinearCase, r: int, dropout: float) -> nn.Module:
        """The layer as the package creates it on the case's base, with these arguments (eval mode)."""
        ...

    def build(self, cls: type, case: LinearCase) -> nn.Module:
        """The layer holding the case's adapter, in eval mode."""
        ...

    def merge(self, cls: type, layer: nn.Module, dequantize: bool = True) -> nn.Module:
        """The merged layer; for a quantized base, dequantized or (``dequantize=False``) re-quantized."""
        ...


class LoRaLayerConvention:
    """mlx-vlm's legacy ``LoRaLayer(linear, rank, alpha, dropout)``; ``A`` (in, r), ``B`` (r, out).

    It documents ``scale = alpha / rank`` and has no rsLoRA switch, so rsLoRA is expressed through
    alpha: ``alpha' = scale * r``. The merge is the module-level ``replace_lora_with_linear(model)``,
    which rewrites ``model.layers`` in place.
    """

    roles = {"A": "A", "B": "B"}

    def construct(self, cls: type, case: LinearCase, r: int, dropout: float) -> nn.Module:
        return _eval_mode(cls(base_linear(case), rank=r, alpha=case.scale * r, dropout=dropout))

    def build(self, cls: type, case: LinearCase) -> nn.Module:
        layer = self.construct(cls, case, case.r, case.dropout)
        load_adapter(
            layer, A=mlx_array(case.lora_A.T, case.adapter_dtype), B=mlx_array(case.lora_B.T, case.adapter_dtype)
        )
        return layer

    def merge(self, cls: type, layer: nn.Module, dequantize: bool = True) -> nn.Module:
        # replace_lora_with_linear re-quantizes a quantized base's merge itself; it has no choice.
        replace_lora_with_linear = sys.modules[cls.__module__].replace_lora_with_linear
        model = nn.Module()
        model.layers = [layer]
        replace_lora_with_linear(model)
        return model.layers[0]


class LoRALinearConvention:
    """``LoRALinear.from_base(linear, r, dropout, scale)`` of mlx-lm and mlx-vlm; merged by ``fuse()``."""

    roles = {"lora_a": "A", "lora_b": "B"}

    def construct(self, cls: type, case: LinearCase, r: int, dropout: float) -> nn.Module:
        return _eval_mode(from_base(cls, base_linear(case), r=r, dropout=dropout, scale=case.scale))

    def build(self, cls: type, case: LinearCase) -> nn.Module:
        return _with_adapter(self.construct(cls, case, case.r, case.dropout), case)

    def merge(self, cls: type, layer: nn.Module, dequantize: bool = True) -> nn.Module:
        return layer.fuse(dequantize=dequantize)


class DoRALinearConvention(LoRALinearConvention):
    """``DoRALinear.from_base(linear, r, dropout, scale)``: as LoRALinear, plus the magnitude ``m`` (out,).

    MLX keeps ``m`` in float32 whatever the base dtype (``set_linear`` computes it from a float32 copy
    of the weight), so the case's magnitude is stored there in float32: the same values, exactly.
    """

    roles = {**LoRALinearConvention.roles, "m": "m"}

    def build(self, cls: type, case: LinearCase) -> nn.Module:
        layer = super().build(cls, case)
        layer.m = mlx_array(case.magnitude, FLOAT32)
        return layer

    def magnitude_at_creation(self, cls: type, case: LinearCase, with_adapter: bool) -> mx.array:
        """The ``m`` that ``set_linear`` derives, with B zero (as created) or the case's B in place."""
        layer = super().build(cls, case)
        if not with_adapter:
            layer.lora_b = mx.zeros_like(layer.lora_b)
        layer.set_linear(layer.linear)
        return layer.m


def base_embedding(case: EmbeddingCase) -> nn.Embedding | nn.QuantizedEmbedding:
    """The frozen MLX ``nn.Embedding`` (or ``nn.QuantizedEmbedding``) with the case's table."""
    vocabulary, dims, q = case.lookup.in_features, case.lookup.out_features, case.quantization
    if q is None:
        embedding = nn.Embedding(vocabulary, dims)
        embedding.weight = mlx_array(case.weight, case.dtype)
        embedding.freeze()
        return embedding
    embedding = nn.QuantizedEmbedding(vocabulary, dims, q.group_size, q.bits, q.mode)
    embedding.weight, embedding.scales, *biases = quantization.to_mlx(case.quantized_parts, case.dtype)
    embedding.biases = biases[0] if biases else None
    embedding.freeze()
    return embedding


class LoRAEmbeddingConvention:
    """``LoRAEmbedding.from_base(embedding, r, dropout, scale)``: ``lora_a`` (vocabulary, r), ``lora_b`` (r, dims).

    peft's ``lora_embedding_A`` is (r, vocabulary) and ``lora_embedding_B`` (dims, r): transposes.
    """

    roles = {"lora_a": "A", "lora_b": "B"}

    def construct(self, cls: type, case: EmbeddingCase, r: int, dropout: float) -> nn.Module:
        return _eval_mode(from_base(cls, base_embedding(case), r=r, dropout=dropout, scale=case.lookup.scale))

    def build(self, cls: type, case: EmbeddingCase) -> nn.Module:
        return _with_adapter(self.construct(cls, case, case.lookup.r, case.lookup.dropout), case.lookup)

    def merge(self, cls: type, layer: nn.Module, dequantize: bool = True) -> nn.Module:
        return layer.fuse(dequantize=dequantize)


class DoRAEmbeddingConvention(LoRAEmbeddingConvention):
    """MLX's ``DoRAEmbedding`` keeps one magnitude per vocabulary row and normalises each token's vector.

    peft keeps one per embedding dimension and normalises each dimension over the vocabulary, so a
    peft magnitude has no MLX counterpart: the layer is given the case's adapter and a magnitude of its
    own kind (`EmbeddingCase.per_row`), and its checks judge it against that definition, stating the
    difference from peft's once. ``m`` is in the table's dtype, as ``set_embedding`` derives it.
    """

    magnitude_per = "vocabulary row"

    def build(self, cls: type, case: EmbeddingCase) -> nn.Module:
        layer = super().build(cls, case)
        layer.m = mlx_array(case.per_row.magnitude, case.dtype)
        return layer

    def magnitude_at_creation(self, cls: type, case: EmbeddingCase, with_adapter: bool) -> mx.array:
        layer = super().build(cls, case)
        if not with_adapter:
            layer.lora_b = mx.zeros_like(layer.lora_b)
        layer.set_embedding(layer.embedding)
        return layer.m


def base_switch(case: SwitchCase, switch_linear: type, quantized_switch_linear: type) -> nn.Module:
    """The frozen ``SwitchLinear`` (``QuantizedSwitchLinear``) base: experts' weights (E, out, in), bias (E, out).

    Both classes come from the subject's own package, whose ``fuse()`` checks for its own types.
    """
    first = case.first
    E, q = case.num_experts, first.quantization
    if q is None:
        switch = switch_linear(first.in_features, first.out_features, E, bias=first.has_bias)
        switch.weight = mlx_array(case.stacked("weight"), case.dtype)
    else:
        switch = quantized_switch_linear(
            first.in_features,
            first.out_features,
            E,
            bias=first.has_bias,
            group_size=q.group_size,
            bits=q.bits,
            mode=q.mode,
        )
        # Each expert's rows were quantized by themselves, as a stacked (E, out, in) weight is.
        parts = [np.stack(part) for part in zip(*(expert.quantized_parts for expert in case.experts))]
        switch.weight, switch.scales, *biases = quantization.to_mlx(tuple(parts), case.dtype)
        switch.biases = biases[0] if biases else None
    if first.has_bias:
        switch.bias = mlx_array(case.stacked("bias"), case.dtype)
    switch.freeze()
    return switch


class LoRASwitchLinearConvention:
    """``LoRASwitchLinear.from_base(switch, r, dropout, scale)``: ``lora_a`` (E, r, in) and ``lora_b``
    (E, out, r), peft's per-expert layouts stacked; merged by ``fuse()``."""

    roles = {"lora_a": "A", "lora_b": "B"}

    def construct(self, cls: type, case: SwitchCase, r: int, dropout: float) -> nn.Module:
        package = sys.modules[cls.__module__]
        base = base_switch(case, package.SwitchLinear, package.QuantizedSwitchLinear)
        return _eval_mode(from_base(cls, base, r=r, dropout=dropout, scale=case.first.scale))

    def build(self, cls: type, case: SwitchCase) -> nn.Module:
        layer = self.construct(cls, case, case.first.r, case.first.dropout)
        load_adapter(
            layer,
            lora_a=mlx_array(case.stacked("lora_A"), case.adapter_dtype),
            lora_b=mlx_array(case.stacked("lora_B"), case.adapter_dtype),
        )
        return layer

    def merge(self, cls: type, layer: nn.Module, dequantize: bool = True) -> nn.Module:
        return layer.fuse(dequantize=dequantize)


def switch_call(layer: nn.Module, case: SwitchCase, x: mx.array | None = None) -> mx.array:
    """Call a switch layer as mlx-lm's ``SwitchGLU`` does: each token's k experts' outputs, (*batch, k, out).

    Unsorted, the tokens keep their places and the indices broadcast over them. Sorted, the (token,
    expert) pairs are listed in expert order, the layer runs on those rows with
    ``sorted_indices=True``, and the outputs go back to the tokens' order.
    """
    x = input_of(case) if x is None else x
    indices = mx.array(case.indices)
    if not case.sorted_indices:
        return layer(x[..., None, None, :], indices).squeeze(-2)
    k = case.top_k
    flat = indices.flatten()
    order = mx.argsort(flat)
    rows = x.reshape(-1, x.shape[-1])[order // k][:, None, :]  # (tokens * k, 1, in)
    output = layer(rows, flat[order], sorted_indices=True).squeeze(-2)
    return output[mx.argsort(order)].reshape(*case.indices.shape, -1)


def load_adapter(layer: nn.Module, **arrays: mx.array) -> None:
    """Give a layer adapter weights, as loading an adapter file does: each must have the shape the layer
    created it with (``load_weights`` refuses others), so a layer that sizes its adapter wrongly fails here."""
    for name, values in arrays.items():
        created = getattr(layer, name).shape
        if tuple(created) != tuple(values.shape):
            raise ValueError(
                f"the layer created {name} with shape {tuple(created)}; the adapter's {name} has shape "
                f"{tuple(values.shape)} and would not load"
            )
        setattr(layer, name, values)


def _with_adapter(layer: nn.Module, case: LinearCase) -> nn.Module:
    """Give an MLX layer (as `construct` made it, in eval mode) the case's A and B in MLX's layout, ``lora_a``
    (in, r) and ``lora_b`` (r, out), in the adapter's dtype, as loading an adapter file does."""
    adapter = case.adapter_dtype
    load_adapter(layer, lora_a=mlx_array(case.lora_A.T, adapter), lora_b=mlx_array(case.lora_B.T, adapter))
    return layer


class InjectedDropout(nn.Module):
    """``nn.Dropout``'s arithmetic, ``(x * mask) * (1 / (1 - p))``, with a given keep-mask (a function of the
    input's shape) instead of a random one, in any mode."""

    def __init__(self, p: float, mask: Callable[[tuple[int, ...]], np.ndarray]):
        super().__init__()
        self.p, self.mask = p, mask

    def __call__(self, x: mx.array) -> mx.array:
        return (x * mx.array(self.mask(tuple(x.shape))).astype(x.dtype)) * (1 / (1 - self.p))


def inject_dropout(layer: nn.Module, p: float, mask: Callable[[tuple[int, ...]], np.ndarray]) -> int:
    """Replace every ``nn.Dropout`` inside the layer by an `InjectedDropout`; how many there were."""
    found = [name for name, module in layer.named_modules() if isinstance(module, nn.Dropout)]
    layer.update_modules(tree_unflatten([(name, InjectedDropout(p, mask)) for name in found]))
    return len(found)


class NotTheSubject(TypeError):
    """The layer built for a subject is not of the subject's class: the checks would judge another layer."""


def _function(method: object) -> object:
    return getattr(method, "__func__", method)


def from_base(cls: type, base: nn.Module, **arguments: object) -> nn.Module:
    """``cls.from_base(base, **arguments)``, a layer of the subject's own class.

    mlx-lm's and mlx-vlm's ``from_base`` construct their class by name (``LoRALinear(...)``), so a subclass
    that inherits it would get the upstream class and never run its own code: it is given its own class
    back (its methods run on the state the inherited ``from_base`` set up; a subclass with state of its own
    defines its own ``from_base``). Any other layer that is not a `cls` raises `NotTheSubject`.
    """
    layer = cls.from_base(base, **arguments)
    built = type(layer)
    if built is not cls and issubclass(cls, built) and _function(cls.from_base) is _function(built.from_base):
        layer.__class__ = cls
    if not isinstance(layer, cls):
        raise NotTheSubject(
            f"{cls.__module__}.{cls.__qualname__}.from_base built a {built.__module__}.{built.__qualname__}, "
            f"not a {cls.__qualname__}: the subject's own code would not run"
        )
    return layer


def _eval_mode(layer: nn.Module) -> nn.Module:
    # MLX modules start in training mode; inference (and peft's reference) runs in eval mode.
    layer.eval()
    return layer


def role(roles: dict[str, str], name: str) -> str:
    """The role of one of a layer's parameters: its convention's, "bias" for a base's bias, or its name."""
    return roles.get(name, "bias" if name.split(".")[-1] == "bias" else name)


def grads(
    layer: nn.Module,
    roles: dict[str, str],
    case: LinearCase | EmbeddingCase,
    upstream: np.ndarray,
    bias_trains: bool = False,
) -> tuple[dict[str, mx.array], set[str]]:
    """MLX's gradients of ``sum(y * T)``: by role (in peft's layouts, MLX's are transposed) and "x" for a
    linear layer, and the roles of the trainable parameters. With `bias_trains` (peft's ``bias="all"``)
    the base's bias is unfrozen first, as a user asking for it would do."""
    if bias_trains:
        layer.unfreeze(keys=["bias"], strict=False)
    embedding = isinstance(case, EmbeddingCase)
    x = mx.array(case.ids) if embedding else mlx_array(case.x, case.dtype)
    t = mlx_array(upstream, case.dtype)

    def loss(model: nn.Module, inputs: mx.array) -> mx.array:
        return (model(inputs) * t).sum()

    _, parameter_grads = nn.value_and_grad(layer, loss)(layer, x)
    trainable = dict(tree_flatten(parameter_grads))
    found = {f"grad {roles[name]}": values.T for name, values in trainable.items() if name in roles}
    if bias_trains:
        found.update({"grad bias": values for name, values in trainable.items() if role(roles, name) == "bias"})
    if not embedding:
        found["grad x"] = mx.grad(lambda inputs: loss(layer, inputs))(x)
    return found, {role(roles, name) for name in trainable}


def training_steps(
    layer: nn.Module,
    roles: dict[str, str],
    case: LinearCase | EmbeddingCase,
    spec: OptimizerSpec,
    target: np.ndarray,
    count: int,
) -> list[dict[str, mx.array]]:
    """The layer's A and B (by role, in peft's layouts) after each of `count` ``mlx.optimizers`` SGD / AdamW
    steps on ``1/2 sum((y - Y)^2)``, in eval mode (no dropout), as a training loop takes them."""
    if spec.kind == "sgd":
        optimizer = optimizers.SGD(learning_rate=spec.lr)
    else:
        optimizer = optimizers.AdamW(
            learning_rate=spec.lr,
            betas=list(spec.betas),
            eps=spec.eps,
            weight_decay=spec.weight_decay,
            bias_correction=True,
        )
    x = mx.array(case.ids) if isinstance(case, EmbeddingCase) else mlx_array(case.x, case.dtype)
    y_target = mlx_array(target, case.dtype)

    def loss(model: nn.Module) -> mx.array:
        return 0.5 * mx.sum(mx.square(model(x) - y_target))

    step = nn.value_and_grad(layer, loss)
    trajectory = []
    for _ in range(count):
        _, grads = step(layer)
        optimizer.update(layer, grads)
        mx.eval(layer.parameters(), optimizer.state)
        parameters = dict(tree_flatten(layer.trainable_parameters()))
        trajectory.append({roles[name]: values.T for name, values in parameters.items() if name in roles})
    return trajectory


def switch_grads(
    layer: nn.Module, roles: dict[str, str], case: SwitchCase, upstream: np.ndarray
) -> tuple[dict[str, mx.array], set[str]]:
    """MLX's gradients of ``sum(y * T)`` through a switch layer called as `switch_call` calls it: A and B by
    role (``lora_a`` (E, r, in) and ``lora_b`` (E, out, r) are peft's per-expert layouts stacked), and x's;
    and the roles of the trainable parameters."""
    x, t = mlx_array(case.x, case.dtype), mlx_array(upstream, case.dtype)

    def loss(model: nn.Module, inputs: mx.array) -> mx.array:
        return (switch_call(model, case, inputs) * t).sum()

    _, parameter_grads = nn.value_and_grad(layer, loss)(layer, x)
    trainable = dict(tree_flatten(parameter_grads))
    found = {f"grad {roles[name]}": values for name, values in trainable.items() if name in roles}
    found["grad x"] = mx.grad(lambda inputs: loss(layer, inputs))(x)
    return found, {role(roles, name) for name in trainable}
