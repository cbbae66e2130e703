"""A correct MLX LoRA linear layer written for the tests, and realistic wrong variants of it.

Each variant changes one thing, the way such bugs are written in real code; `catalogue`
turns them into subjects and says which check must catch each.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.tuner.dora import DoRAEmbedding as UpstreamDoRAEmbedding
from mlx_lm.tuner.lora import LoRALinear as UpstreamLoRALinear

from foundation.cases import LinearCase
from subjects.bridge import (
    LoRASwitchLinearConvention,
    base_embedding,
    base_linear,
    base_switch,
    load_adapter,
    mlx_array,
)


class CorrectLoRALinear(nn.Module):
    """LoRA as peft defines it: ``y = x W^T + b + s (dropout(x) A) B`` with A (in, r) and B (r, out)."""

    weight_dtype: mx.Dtype | None = None
    """The model's dtype, to dequantize a quantized base into."""

    def __init__(self, linear: nn.Module, r: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0):
        super().__init__()
        output_dims, input_dims = linear.weight.shape
        if isinstance(linear, nn.QuantizedLinear):
            input_dims = input_dims * 32 // linear.bits  # the packed width holds 32 // bits values per word
        self.linear = linear
        self.dropout = nn.Dropout(p=dropout)
        self.scale = self.scaling(alpha, r, use_rslora)
        self.lora_a = mx.zeros((input_dims, r))
        self.lora_b = mx.zeros((r, output_dims))

    @staticmethod
    def scaling(alpha: float, r: int, use_rslora: bool) -> float:
        if r <= 0:
            raise ValueError(f"r should be a positive integer, but is {r}")
        return alpha / math.sqrt(r) if use_rslora else alpha / r

    def lora_update(self, x: mx.array) -> mx.array:
        return (self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)).astype(x.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear(x) + self.lora_update(x)

    def delta(self) -> mx.array:
        """The update as a weight, (out, in)."""
        return (self.scale * self.lora_b.T) @ self.lora_a.T

    def base_weight(self) -> mx.array:
        """The base weight, dequantized (in the scales' dtype) if the base is quantized."""
        linear = self.linear
        if not isinstance(linear, nn.QuantizedLinear):
            return linear.weight
        return mx.dequantize(
            linear.weight,
            linear.scales,
            linear.get("biases"),
            linear.group_size,
            linear.bits,
            linear.mode,
            dtype=self.weight_dtype,
        )

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = self.base_weight()
        output_dims, input_dims = weight.shape
        fused = nn.Linear(input_dims, output_dims, bias="bias" in self.linear)
        fused.weight = weight + self.delta().astype(weight.dtype)
        if "bias" in self.linear:
            fused.bias = self.linear.bias
        return self.requantized(fused) if self.quantized and not dequantize else fused

    @property
    def quantized(self) -> bool:
        return isinstance(self.linear, nn.QuantizedLinear)

    def requantized(self, fused: nn.Linear) -> nn.QuantizedLinear:
        linear = self.linear
        return nn.QuantizedLinear.from_linear(fused, linear.group_size, linear.bits, mode=linear.mode)


class RawAlpha(CorrectLoRALinear):
    """mlx-vlm 0.4.4's bug: the update is multiplied by alpha instead of alpha / r."""

    @staticmethod
    def scaling(alpha: float, r: int, use_rslora: bool) -> float:
        return alpha


class SwappedScalingRules(CorrectLoRALinear):
    """rsLoRA's alpha / sqrt(r) used when it is off, and alpha / r when it is on."""

    @staticmethod
    def scaling(alpha: float, r: int, use_rslora: bool) -> float:
        return alpha / r if use_rslora else alpha / math.sqrt(r)


class TransposedMerge(CorrectLoRALinear):
    """The merged update is built as s A B, (in, out), and added without the transpose."""

    def delta(self) -> mx.array:
        return self.scale * (self.lora_a @ self.lora_b)


class MergeDropsBias(CorrectLoRALinear):
    """The fused layer is created without the base layer's bias."""

    def fuse(self, dequantize: bool = False) -> nn.Module:
        fused = super().fuse(dequantize=True)
        if "bias" in fused:
            del fused["bias"]
        return self.requantized(fused) if self.quantized and not dequantize else fused


class AlwaysOnDropout(nn.Module):
    """A hand-written dropout that forgets to check ``self.training``."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def __call__(self, x: mx.array) -> mx.array:
        if self.p == 0:
            return x
        keep = mx.random.bernoulli(1 - self.p, x.shape)
        return mx.where(keep, x / (1 - self.p), mx.zeros_like(x))


class DropoutInEval(CorrectLoRALinear):
    """Dropout stays active in eval mode."""

    def __init__(self, linear, r, alpha, use_rslora=False, dropout=0.0):
        super().__init__(linear, r, alpha, use_rslora, dropout)
        self.dropout = AlwaysOnDropout(dropout)


class DropoutOnBasePath(CorrectLoRALinear):
    """The input is dropped before the base layer too, not only on the adapter's path."""

    def __call__(self, x: mx.array) -> mx.array:
        dropped = self.dropout(x)
        return self.linear(dropped) + (self.scale * ((dropped @ self.lora_a) @ self.lora_b)).astype(x.dtype)


class DropoutOnLoRAOutput(CorrectLoRALinear):
    """Dropout applied to the LoRA term's output instead of its input."""

    def lora_update(self, x: mx.array) -> mx.array:
        return (self.scale * self.dropout((x @ self.lora_a) @ self.lora_b)).astype(x.dtype)


class UnscaledDropout(nn.Dropout):
    """Drops elements but forgets to rescale the kept ones by 1 / (1 - p)."""

    def __call__(self, x: mx.array) -> mx.array:
        if not self.training or self._p_1 == 1:
            return x
        return mx.random.bernoulli(self._p_1, x.shape) * x


class DropoutNotRescaled(CorrectLoRALinear):
    """Its dropout keeps elements without the 1 / (1 - p) rescaling: the training-mode LoRA term shrinks by 1 - p."""

    def __init__(self, linear, r, alpha, use_rslora=False, dropout=0.0):
        super().__init__(linear, r, alpha, use_rslora, dropout)
        self.dropout = UnscaledDropout(dropout)


class UpdateCastToFloat16(CorrectLoRALinear):
    """The LoRA update is cast to float16 instead of the input's dtype."""

    def lora_update(self, x: mx.array) -> mx.array:
        return (self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)).astype(mx.float16)


class QuantizedWidthRoundedDown(CorrectLoRALinear):
    """Sizes the adapter of a quantized base as packed width × (32 // bits), as mlx-lm's DoRALinear does:
    short for 3, 5 and 6 bits, whose values straddle 32-bit words."""

    def __init__(self, linear: nn.Module, r: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0):
        super().__init__(linear, r, alpha, use_rslora, dropout)
        if isinstance(linear, nn.QuantizedLinear):
            self.lora_a = mx.zeros((linear.weight.shape[1] * (32 // linear.bits), r))


class GradientLeaksIntoBase(CorrectLoRALinear):
    """Unfreezes the base it wraps: training would update the base weight (and bias) too."""

    def __init__(self, linear: nn.Module, r: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0):
        super().__init__(linear, r, alpha, use_rslora, dropout)
        self.linear.unfreeze()


class CachesLoRAProduct(CorrectLoRALinear):
    """Saves a matmul per call by keeping ``s B A`` from its first call: every output and gradient of the
    layer as created is right, but once an optimizer moves A and B the cached product is stale."""

    def lora_update(self, x: mx.array) -> mx.array:
        if "_delta" not in self:
            self._delta = self.delta()
        return (self.dropout(x) @ self._delta.T).astype(x.dtype)


class SwappedAB(CorrectLoRALinear):
    """A and B used in each other's place, as if ``lora_b`` were (out, r) and ``lora_a`` (r, in)."""

    def lora_update(self, x: mx.array) -> mx.array:
        return (self.scale * ((self.dropout(x) @ self.lora_b.T) @ self.lora_a.T)).astype(x.dtype)


class BiasAddedTwice(CorrectLoRALinear):
    """The base bias is added again on top of the base layer's output."""

    def __call__(self, x: mx.array) -> mx.array:
        out = super().__call__(x)
        return out + self.linear.bias if "bias" in self.linear else out


class MergeScalesTwice(CorrectLoRALinear):
    """The merge multiplies by the scale twice."""

    def delta(self) -> mx.array:
        return self.scale * super().delta()


class MergeUpcast(CorrectLoRALinear):
    """fuse() returns a float32 weight whatever the base's dtype (as MLX's DoRALinear does): one known divergence."""

    def fuse(self, dequantize: bool = False) -> nn.Module:
        fused = super().fuse(dequantize=True)
        fused.weight = self.base_weight().astype(mx.float32) + self.delta().astype(mx.float32)
        return fused


class MergeUpcastAndScalesTwice(MergeUpcast):
    """The upcast, and behind it a second bug: the merge multiplies by the scale twice."""

    def delta(self) -> mx.array:
        return self.scale * super().delta()


class MergeRefusesBiasFree(CorrectLoRALinear):
    """fuse() raises for a base without a bias: one known divergence."""

    def fuse(self, dequantize: bool = False) -> nn.Module:
        if "bias" not in self.linear:
            raise NotImplementedError("cannot fuse a bias-free base")
        return super().fuse(dequantize)


class MergeRefusesBiasFreeAndScalesTwice(MergeRefusesBiasFree):
    """The refusal, and behind it, on bases with a bias, a merge that multiplies by the scale twice."""

    def delta(self) -> mx.array:
        return self.scale * super().delta()


class RawAlphaDropsBias(RawAlpha):
    """mlx-vlm 0.4.4's raw alpha, and behind it a second bug: the output drops the base's bias."""

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.linear.bias if "bias" in self.linear else 0.0
        return self.linear(x) - bias + self.lora_update(x)


class RankCheckCrashes(CorrectLoRALinear):
    """Meets a bad rank with an unrelated crash (a TypeError that names nothing), not the ValueError it deserves."""

    @staticmethod
    def scaling(alpha: float, r: int, use_rslora: bool) -> float:
        if r <= 0:
            raise TypeError("unsupported operand type(s) for /: 'float' and 'NoneType'")
        return CorrectLoRALinear.scaling(alpha, r, use_rslora)


class UpstreamLoRADropsARank(UpstreamLoRALinear):
    """mlx-lm's LoRALinear subclassed, as a user would, with a forward that drops the adapter's last rank.

    It inherits ``from_base``, which builds an mlx-lm ``LoRALinear`` by name: the suite must still run this class."""

    def __call__(self, x: mx.array) -> mx.array:
        z = (self.dropout(x) @ self.lora_a[:, :-1]) @ self.lora_b[:-1]
        return self.linear(x) + (self.scale * z).astype(x.dtype)


class FromBaseBuildsAnother(UpstreamLoRALinear):
    """A subclass whose own ``from_base`` returns mlx-lm's class: not the subject, whatever it computes."""

    @staticmethod
    def from_base(linear: nn.Module, r: int = 8, dropout: float = 0.0, scale: float = 20.0) -> nn.Module:
        return UpstreamLoRALinear.from_base(linear, r=r, dropout=dropout, scale=scale)


class UpstreamDoRAEmbeddingNormWithoutAdapter(UpstreamDoRAEmbedding):
    """mlx-lm's DoRAEmbedding with a regression: each token's norm is taken from the table alone, ``||W[ids]||``,
    not from the adapted row ``||W[ids] + s A[ids] B||``."""

    def __call__(self, x: mx.array) -> mx.array:
        y = self.embedding(x)
        out = y + self.dropout(self.scale * self.lora_a[x] @ self.lora_b).astype(y.dtype)
        return (self.m[x] / mx.stop_gradient(mx.linalg.norm(y, axis=-1)))[..., None] * out


class FuseIgnoresAdapter(CorrectLoRALinear):
    """The fused layer is the base layer alone."""

    def delta(self) -> mx.array:
        return mx.zeros_like(self.base_weight())


class RequantizeIgnoresAdapter(CorrectLoRALinear):
    """On a quantized base, ``fuse()`` re-quantizes the base weight instead of the merged one."""

    def requantized(self, fused: nn.Linear) -> nn.QuantizedLinear:
        fused.weight = self.base_weight()
        return super().requantized(fused)


# Wrong only with a float32 adapter on a half-precision base ----------------------------------------


class OutputInAdapterDtype(CorrectLoRALinear):
    """The LoRA term is added without casting it to the input's dtype: a float32 adapter makes the output float32."""

    def lora_update(self, x: mx.array) -> mx.array:
        return self.scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)


class AdapterCastToBaseDtype(CorrectLoRALinear):
    """The adapter is cast to the base's dtype when it is loaded (as ``model.set_dtype`` after loading would):
    a float32 adapter trains in half precision."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("lora_a", "lora_b") and isinstance(value, mx.array) and "linear" in self:
            value = value.astype(self.base_weight().dtype)
        super().__setattr__(name, value)


class UpdateInHalfPrecision(CorrectLoRALinear):
    """The update is computed in the input's dtype: a float32 adapter is cast down for the products, so its
    gradients carry half-precision rounding."""

    def lora_update(self, x: mx.array) -> mx.array:
        a, b = self.lora_a.astype(x.dtype), self.lora_b.astype(x.dtype)
        return (self.scale * ((self.dropout(x) @ a) @ b)).astype(x.dtype)


class MergeInAdapterDtype(CorrectLoRALinear):
    """The merged weight is ``W + s B A`` without casting the update to the base's dtype: float32 with a float32
    adapter (as mlx-lm's DoRALinear does for its magnitude's factor)."""

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = self.base_weight()
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in self.linear)
        fused.weight = weight + self.delta()
        if "bias" in self.linear:
            fused.bias = self.linear.bias
        return self.requantized(fused) if self.quantized and not dequantize else fused


class RequantizeInAdapterDtype(MergeInAdapterDtype):
    """Re-quantizes that float32 merge: an affine quantization's scales come out float32, not the base's dtype."""


class RequantizeWithDefaults(CorrectLoRALinear):
    """On a quantized base, ``fuse()`` re-quantizes with MLX's default bits and group size."""

    def requantized(self, fused: nn.Linear) -> nn.QuantizedLinear:
        return nn.QuantizedLinear.from_linear(fused, mode=self.linear.mode)


# Subtle: each element within its bound, the error systematic (`foundation.systematic` catches them) ---------------


class ScaleOffInBfloat16(CorrectLoRALinear):
    """A bfloat16-only code path whose scale is 1% off (as ``alpha / r`` taken from a rank rounded the wrong way)."""

    def lora_update(self, x: mx.array) -> mx.array:
        update = super().lora_update(x)
        return (update * 1.01).astype(x.dtype) if x.dtype == mx.bfloat16 else update


class ScaleRoundedToBfloat16(CorrectLoRALinear):
    """The scale is kept as a bfloat16 array, so every dtype uses alpha / r rounded to 8 bits (off by up to 0.4%)."""

    def lora_update(self, x: mx.array) -> mx.array:
        scale = mx.array(self.scale, dtype=mx.bfloat16)
        return (scale * ((self.dropout(x) @ self.lora_a) @ self.lora_b)).astype(x.dtype)

    def delta(self) -> mx.array:
        return (mx.array(self.scale, dtype=mx.bfloat16) * self.lora_b.T) @ self.lora_a.T


class UpdateAccumulatedInHalfPrecision(CorrectLoRALinear):
    """The update ``s B A`` is summed rank by rank in the weight's dtype (a loop over the rank, as code that adds
    one rank-1 update at a time does): the merged weight carries one half-precision rounding per rank."""

    def delta(self) -> mx.array:
        dtype = self.base_weight().dtype
        total = mx.zeros((self.lora_b.shape[1], self.lora_a.shape[0]), dtype=dtype)
        for k in range(self.lora_a.shape[1]):
            total = total + (self.scale * mx.outer(self.lora_b[k], self.lora_a[:, k])).astype(dtype)
        return total


class BiasScaledSlightly(CorrectLoRALinear):
    """The bias is multiplied by 1 + 2^-7 on its way in (as a bias folded through a rounded constant would be)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = super().__call__(x)
        if "bias" in self.linear:
            y = y + (self.linear.bias * 2.0**-7).astype(y.dtype)
        return y


class PeftStyleConvention:
    """How the layers above are built from a case: they take peft's own (r, alpha, use_rslora).

    A microscaling base has no floating parts to tell the model's dtype, so the layer is told it.
    """

    roles = {"lora_a": "A", "lora_b": "B"}

    def construct(self, cls: type, case: LinearCase, r: int, dropout: float) -> nn.Module:
        CorrectLoRALinear.weight_dtype = getattr(mx, case.dtype.name)
        layer = cls(base_linear(case), r=r, alpha=case.alpha, use_rslora=case.use_rslora, dropout=dropout)
        layer.eval()
        return layer

    def build(self, cls: type, case: LinearCase) -> nn.Module:
        layer = self.construct(cls, case, case.r, case.dropout)
        adapter = case.adapter_dtype
        load_adapter(layer, lora_a=mlx_array(case.lora_A.T, adapter), lora_b=mlx_array(case.lora_B.T, adapter))
        layer.eval()
        return layer

    def merge(self, cls: type, layer: nn.Module, dequantize: bool = True) -> nn.Module:
        return layer.fuse(dequantize=dequantize)


class DoRAMagnitude:
    """DoRA's magnitude, mixed into a LoRA layer: m = ||W + delta|| along `norm_axis` of the frozen weight W,
    derived at construction, and the factor m / ||W + delta|| by which the layer scales its output.

    The norm is taken in float32 (no half-precision under- or overflow) of W plus the update in the adapter's
    dtype, and detached from the gradient, as in the DoRA paper and peft; m is stored in the adapter's dtype.
    """

    norm_axis: int

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.derive_magnitude()

    def frozen(self) -> mx.array:
        """The weight DoRA rescales, in the layout of `delta()`."""
        raise NotImplementedError

    def adapted(self) -> mx.array:
        """W + delta, in the finer of their dtypes (a float32 adapter's update is not cast down first)."""
        return self.frozen() + self.delta()

    def weight_norm(self) -> mx.array:
        return mx.linalg.norm(self.adapted().astype(mx.float32), axis=self.norm_axis)

    def derive_magnitude(self) -> None:
        self.m = self.weight_norm().astype(self.lora_a.dtype)

    def factor(self) -> mx.array:
        return self.m.astype(mx.float32) / mx.stop_gradient(self.weight_norm())


class CorrectDoRALinear(DoRAMagnitude, CorrectLoRALinear):
    """DoRA as peft defines it: ``y = m / ||W + s B A|| * (x W^T + s (x A^T) B^T) + b``, one magnitude per
    output row."""

    norm_axis = 1

    def frozen(self) -> mx.array:
        return self.base_weight()

    def __call__(self, x: mx.array) -> mx.array:
        # peft's form: the base output of x, and a correction from the dropped input x' (x in eval mode), in the
        # adapter's dtype (peft casts x to it before its dropout), added to the base's output and the sum cast to
        # x's dtype once.
        adapter_dtype, weight = self.lora_a.dtype, self.base_weight().astype(x.dtype).T
        dropped, factor = self.dropout(x.astype(adapter_dtype)), self.factor().astype(adapter_dtype)
        lora = self.scale * ((dropped @ self.lora_a) @ self.lora_b)
        out = x @ weight
        if "bias" in self.linear:
            out = out + self.linear.bias
        correction = (factor - 1) * (dropped @ weight.astype(adapter_dtype)) + factor * lora
        return (out + correction).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        fused = super().fuse(dequantize=True)
        fused.weight = (self.factor()[:, None] * self.adapted()).astype(self.base_weight().dtype)
        return self.requantized(fused) if self.quantized and not dequantize else fused


class DoRANormOverColumns(CorrectDoRALinear):
    """The weight norm taken over the output axis (per input column) instead of per output row."""

    norm_axis = 0


class DoRANormWithoutAdapter(CorrectDoRALinear):
    """The norm taken of the base weight alone, as if the adapter did not change it."""

    def weight_norm(self) -> mx.array:
        return mx.linalg.norm(self.base_weight().astype(mx.float32), axis=1)


class DoRANormNotDetached(CorrectDoRALinear):
    """The weight norm left in the gradient graph, against the DoRA paper's (and peft's) detached norm:
    the outputs are right, the gradients of A and B are not."""

    def factor(self) -> mx.array:
        return self.m.astype(mx.float32) / self.weight_norm()


class DoRAMergeForgetsMagnitude(CorrectDoRALinear):
    """The merge folds in the LoRA update but not the magnitude / norm factor."""

    def fuse(self, dequantize: bool = False) -> nn.Module:
        return CorrectLoRALinear.fuse(self, dequantize)


class PeftStyleDoRAConvention(PeftStyleConvention):
    """As `PeftStyleConvention`, with the case's magnitude, in the adapter's dtype."""

    roles = {**PeftStyleConvention.roles, "m": "m"}

    def build(self, cls: type, case: LinearCase) -> nn.Module:
        layer = super().build(cls, case)
        layer.m = mlx_array(case.magnitude, case.adapter_dtype)
        return layer

    def magnitude_at_creation(self, cls: type, case: LinearCase, with_adapter: bool) -> mx.array:
        layer = super().build(cls, case)
        if not with_adapter:
            layer.lora_b = mx.zeros_like(layer.lora_b)
        layer.derive_magnitude()
        return layer.m


class CorrectLoRAEmbedding(nn.Module):
    """LoRA on an embedding as peft defines it: ``W[ids] + s A^T[ids] B^T``; lora_a (V, r), lora_b (r, D).

    A quantized table is dequantized into the model's dtype, one id or many.
    """

    weight_dtype: mx.Dtype | None = None
    """The model's dtype, to dequantize a quantized table into."""

    def __init__(self, embedding: nn.Module, r: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0):
        super().__init__()
        vocabulary, dims = embedding.weight.shape
        if isinstance(embedding, nn.QuantizedEmbedding):
            dims = embedding.scales.shape[-1] * embedding.group_size
        self.embedding = embedding
        self.dropout = nn.Dropout(p=dropout)
        self.scale = CorrectLoRALinear.scaling(alpha, r, use_rslora)
        self.lora_a = mx.zeros((vocabulary, r))
        self.lora_b = mx.zeros((r, dims))

    @property
    def quantized(self) -> bool:
        return isinstance(self.embedding, nn.QuantizedEmbedding)

    def table(self) -> mx.array:
        """The base table, (V, D), dequantized into the model's dtype if quantized."""
        e = self.embedding
        if not self.quantized:
            return e.weight
        return mx.dequantize(e.weight, e.scales, e.get("biases"), e.group_size, e.bits, e.mode, dtype=self.weight_dtype)

    def delta(self) -> mx.array:
        """The update as a table, (V, D)."""
        return (self.scale * self.lora_a) @ self.lora_b

    def check_ids(self, ids: mx.array) -> None:
        vocabulary = self.lora_a.shape[0]
        outside = (ids < 0) | (ids >= vocabulary)
        if mx.any(outside).item():
            bad = sorted({int(i) for i in ids.flatten().tolist() if not 0 <= i < vocabulary})
            raise IndexError(f"token ids {', '.join(map(str, bad))} lie outside [0, {vocabulary})")

    def __call__(self, ids: mx.array) -> mx.array:
        self.check_ids(ids)
        y = self.table()[ids]
        return y + (self.scale * (self.lora_a[ids] @ self.lora_b)).astype(y.dtype)

    def as_linear(self, x: mx.array) -> mx.array:
        update = (self.dropout(x) @ self.lora_b.T) @ self.lora_a.T
        return self.embedding.as_linear(x) + (self.scale * update).astype(x.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = self.table()
        fused = nn.Embedding(*weight.shape)
        fused.weight = weight + self.delta().astype(weight.dtype)
        if not self.quantized or dequantize:
            return fused
        e = self.embedding
        return nn.QuantizedEmbedding.from_embedding(fused, e.group_size, e.bits, mode=e.mode)


class EmbeddingLookupUnscaled(CorrectLoRAEmbedding):
    """The lookup adds the LoRA term without the scale."""

    def __call__(self, ids: mx.array) -> mx.array:
        self.check_ids(ids)
        y = self.table()[ids]
        return y + (self.lora_a[ids] @ self.lora_b).astype(y.dtype)


class LookupWithoutRangeCheck(CorrectLoRAEmbedding):
    """Token ids outside the vocabulary are gathered from wherever they land, without an error."""

    def check_ids(self, ids: mx.array) -> None:
        pass


class AsLinearIgnoresAdapter(CorrectLoRAEmbedding):
    """The tied output head uses the base table alone."""

    def as_linear(self, x: mx.array) -> mx.array:
        return self.embedding.as_linear(x)


class LookupInDefaultDtype(CorrectLoRAEmbedding):
    """A quantized table is dequantized without a dtype, as ``nn.QuantizedEmbedding`` does: an mx
    table's lookups come back bfloat16 whatever the model's dtype."""

    def table(self) -> mx.array:
        e = self.embedding
        if not self.quantized:
            return e.weight
        return mx.dequantize(e.weight, e.scales, e.get("biases"), e.group_size, e.bits, e.mode)


class EmbeddingMergeTransposed(CorrectLoRAEmbedding):
    """The merge builds the update as (D, V), the linear layout, and adds it to the (V, D) table."""

    def delta(self) -> mx.array:
        return super().delta().T


class EmbeddingUpdateInTableDtype(CorrectLoRAEmbedding):
    """A float32 adapter is cast to the table's dtype before the lookup forms its update: the update, and A's and
    B's gradients, are computed in half precision."""

    def __call__(self, ids: mx.array) -> mx.array:
        self.check_ids(ids)
        y = self.table()[ids]
        lora_a, lora_b = self.lora_a.astype(y.dtype), self.lora_b.astype(y.dtype)
        return y + self.scale * (lora_a[ids] @ lora_b)


class CorrectDoRAEmbedding(DoRAMagnitude, CorrectLoRAEmbedding):
    """DoRA on an embedding as peft defines it: the table seen as the linear map from one-hot ids, so one
    magnitude per embedding dimension, m (D,), and each dimension of W + s A B normalised over the
    vocabulary: ``m / ||W + s A B||_columns * (W + s A B)[ids]``."""

    norm_axis = 0

    def frozen(self) -> mx.array:
        return self.table()

    def merged_table(self) -> mx.array:
        return (self.factor() * self.adapted()).astype(self.table().dtype)

    def __call__(self, ids: mx.array) -> mx.array:
        self.check_ids(ids)
        y = self.table()[ids]
        lora = (self.scale * (self.lora_a[ids] @ self.lora_b)).astype(y.dtype)
        return self.factor().astype(y.dtype) * (y + lora)

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self.merged_table().T

    def fuse(self, dequantize: bool = False) -> nn.Module:
        fused = nn.Embedding(*self.table().shape)
        fused.weight = self.merged_table()
        return fused


class DoRAEmbeddingNormPerToken(CorrectDoRAEmbedding):
    """Normalises each token's vector, one magnitude per vocabulary row (as MLX's DoRAEmbedding does), instead
    of each embedding dimension over the vocabulary: the norm taken over the wrong axis of the linear map."""

    norm_axis = 1

    def factor(self) -> mx.array:
        return (self.m.astype(mx.float32) / mx.stop_gradient(self.weight_norm()))[:, None]

    def __call__(self, ids: mx.array) -> mx.array:
        self.check_ids(ids)
        y = self.table()[ids]
        lora = (self.scale * (self.lora_a[ids] @ self.lora_b)).astype(y.dtype)
        return self.factor()[ids].astype(y.dtype) * (y + lora)


class PeftStyleEmbeddingConvention:
    """How the embedding layers above are built from a case: peft's (r, alpha, use_rslora)."""

    roles = PeftStyleConvention.roles

    def construct(self, cls: type, case, r: int, dropout: float) -> nn.Module:
        lookup = case.lookup
        CorrectLoRAEmbedding.weight_dtype = getattr(mx, case.dtype.name)
        layer = cls(base_embedding(case), r=r, alpha=lookup.alpha, use_rslora=lookup.use_rslora, dropout=dropout)
        layer.eval()
        return layer

    def build(self, cls: type, case) -> nn.Module:
        lookup = case.lookup
        layer = self.construct(cls, case, lookup.r, lookup.dropout)
        adapter = lookup.adapter_dtype
        load_adapter(layer, lora_a=mlx_array(lookup.lora_A.T, adapter), lora_b=mlx_array(lookup.lora_B.T, adapter))
        layer.eval()
        return layer

    def merge(self, cls: type, layer: nn.Module, dequantize: bool = True) -> nn.Module:
        return layer.fuse(dequantize=dequantize)


class PeftStyleDoRAEmbeddingConvention(PeftStyleEmbeddingConvention):
    """As `PeftStyleEmbeddingConvention`, with the case's magnitude (per embedding dimension), in the adapter's
    dtype."""

    roles = {**PeftStyleEmbeddingConvention.roles, "m": "m"}

    def build(self, cls: type, case) -> nn.Module:
        layer = super().build(cls, case)
        layer.m = mlx_array(case.lookup.magnitude, case.lookup.adapter_dtype)
        return layer

    def magnitude_at_creation(self, cls: type, case, with_adapter: bool) -> mx.array:
        layer = super().build(cls, case)
        if not with_adapter:
            layer.lora_b = mx.zeros_like(layer.lora_b)
        layer.derive_magnitude()
        return layer.m


# Mixture of experts ------------------------------------------------------------------------------


class GatheredSwitchLinear(nn.Module):
    """A ``SwitchLinear`` base that gathers each token's experts' weights: it runs in every dtype, where
    MLX's CPU ``gather_mm`` takes float32 only. Weight (E, out, in), bias (E, out)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = True):
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    def expert_weights(self, dtype: mx.Dtype | None = None) -> mx.array:
        return self.weight

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        output = x @ self.expert_weights(x.dtype)[indices].swapaxes(-1, -2)
        return output + mx.expand_dims(self.bias[indices], -2) if "bias" in self else output


class GatheredQuantizedSwitchLinear(GatheredSwitchLinear):
    """The quantized base: the experts' weights are dequantized (into the input's dtype) and gathered."""

    def __init__(self, input_dims, output_dims, num_experts, bias=True, group_size=64, bits=4, mode="affine"):
        super().__init__(input_dims, output_dims, num_experts, bias)
        self.group_size, self.bits, self.mode = group_size, bits, mode

    def expert_weights(self, dtype: mx.Dtype | None = None) -> mx.array:
        return mx.dequantize(
            self.weight, self.scales, self.get("biases"), self.group_size, self.bits, self.mode, dtype=dtype
        )


class CorrectLoRASwitchLinear(nn.Module):
    """LoRA on every expert, as peft's ``target_parameters`` defines it: a token routed to expert e gets
    ``x W_e^T + b_e + s (x A_e^T) B_e^T``; ``lora_a`` (E, r, in), ``lora_b`` (E, out, r)."""

    weight_dtype: mx.Dtype | None = None
    """The model's dtype, to dequantize a quantized base into."""

    def __init__(
        self, switch: GatheredSwitchLinear, r: int, alpha: float, use_rslora: bool = False, dropout: float = 0.0
    ):
        super().__init__()
        num_experts, output_dims, _ = switch.weight.shape
        input_dims = switch.scales.shape[-1] * switch.group_size if "scales" in switch else switch.weight.shape[-1]
        self.linear = switch
        self.dropout = nn.Dropout(p=dropout)
        self.scale = CorrectLoRALinear.scaling(alpha, r, use_rslora)
        self.lora_a = mx.zeros((num_experts, r, input_dims))
        self.lora_b = mx.zeros((num_experts, output_dims, r))

    def adapters(self, indices: mx.array) -> tuple[mx.array, mx.array]:
        """Each token's experts' A and B."""
        return self.lora_a[indices], self.lora_b[indices]

    def check_indices(self, indices: mx.array) -> None:
        if indices.size and int(indices.max()) >= self.lora_a.shape[0]:
            raise IndexError(f"expert indices must lie in [0, {self.lora_a.shape[0]})")

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        self.check_indices(indices)
        lora_a, lora_b = self.adapters(indices)
        update = (self.dropout(x) @ lora_a.swapaxes(-1, -2)) @ lora_b.swapaxes(-1, -2)
        return self.linear(x, indices) + (self.scale * update).astype(x.dtype)

    def merged_weights(self) -> mx.array:
        weight = self.linear.expert_weights(self.weight_dtype)
        return weight + (self.scale * (self.lora_b @ self.lora_a)).astype(weight.dtype)

    def fuse(self, dequantize: bool = False) -> nn.Module:
        weight = self.merged_weights()
        num_experts, output_dims, input_dims = weight.shape
        fused = GatheredSwitchLinear(input_dims, output_dims, num_experts, bias="bias" in self.linear)
        fused.weight = weight
        if "bias" in self.linear:
            fused.bias = self.linear.bias
        if "scales" not in self.linear or dequantize:
            return fused
        base = self.linear
        requantized = GatheredQuantizedSwitchLinear(
            input_dims, output_dims, num_experts, "bias" in base, base.group_size, base.bits, base.mode
        )
        requantized.weight, requantized.scales, *biases = mx.quantize(
            weight, base.group_size, base.bits, mode=base.mode
        )
        requantized.biases = biases[0] if biases else None
        if "bias" in base:
            requantized.bias = base.bias
        return requantized


class AdapterIgnoresRouting(CorrectLoRASwitchLinear):
    """A dense LoRA bolted onto an MoE layer: every token gets expert 0's adapter."""

    def adapters(self, indices: mx.array) -> tuple[mx.array, mx.array]:
        return super().adapters(mx.zeros_like(indices))


class ExpertBiasNotRouted(CorrectLoRASwitchLinear):
    """The base's bias is taken from the first expert for every token, as if it were a dense layer's."""

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        output = super().__call__(x, indices, sorted_indices)
        if "bias" not in self.linear:
            return output
        return output - mx.expand_dims(self.linear.bias[indices], -2) + self.linear.bias[0]


class ExpertIndexUnchecked(CorrectLoRASwitchLinear):
    """Routes to whatever an index past the last expert finds, as ``gather_mm`` does."""

    def check_indices(self, indices: mx.array) -> None:
        pass


class SwitchFuseIgnoresAdapter(CorrectLoRASwitchLinear):
    """``fuse()`` returns the experts' base weights: the adapter is lost."""

    def merged_weights(self) -> mx.array:
        return self.linear.expert_weights(self.weight_dtype)


class PeftStyleSwitchConvention(LoRASwitchLinearConvention):
    """The switch layers above take peft's (r, alpha, use_rslora), on the gathering bases."""

    def construct(self, cls: type, case, r: int, dropout: float) -> nn.Module:
        base = base_switch(case, GatheredSwitchLinear, GatheredQuantizedSwitchLinear)
        first = case.first
        CorrectLoRASwitchLinear.weight_dtype = getattr(mx, case.dtype.name)
        layer = cls(base, r=r, alpha=first.alpha, use_rslora=first.use_rslora, dropout=dropout)
        layer.eval()
        return layer
