"""The quantization modes of the installed MLX, and what a quantized base's weight really is.

A quantized base does not hold the drawn weight ``W`` but ``dequantize(quantize(W))``: that is the
weight the case carries, the one peft's reference and the oracle use.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from foundation.dtypes import DType


@dataclass(frozen=True)
class Quantization:
    mode: str
    bits: int
    group_size: int

    @property
    def kind(self) -> str:
        """The mode, with affine split by whether a value fits whole in a 32-bit word: 1, 2, 4 and 8
        bits do ("affine"); 3, 5 and 6 bits straddle words ("affine-unaligned"), which code that
        sizes a layer from the packed width has got wrong."""
        if self.mode != "affine":
            return self.mode
        return "affine" if 32 % self.bits == 0 else "affine-unaligned"

    def __str__(self) -> str:
        return (
            f"{self.mode}{self.bits}g{self.group_size}" if self.mode == "affine" else f"{self.mode}g{self.group_size}"
        )

    def describe(self) -> dict:
        return {"mode": self.mode, "bits": self.bits, "group_size": self.group_size}


_CANDIDATES = (
    *(Quantization("affine", bits, group) for bits in (1, 2, 3, 4, 5, 6, 8) for group in (32, 64, 128)),
    Quantization("mxfp4", 4, 32),
    Quantization("mxfp8", 8, 32),
    Quantization("nvfp4", 4, 16),
)


def _supported(quantization: Quantization) -> bool:
    try:
        mx.eval(mx.quantize(mx.ones((1, quantization.group_size)), **quantization.describe()))
    except (ValueError, RuntimeError):
        return False
    return True


AVAILABLE: tuple[Quantization, ...] = tuple(q for q in _CANDIDATES if _supported(q))
"""Every mode, bit width and group size the installed MLX offers on this device (of those it documents)."""
UNAVAILABLE: tuple[Quantization, ...] = tuple(q for q in _CANDIDATES if q not in AVAILABLE)


def quantize(weight: mx.array, quantization: Quantization) -> tuple[mx.array, ...]:
    return mx.quantize(weight, **quantization.describe())


def dequantize(parts: tuple[mx.array, ...], quantization: Quantization, dtype: mx.Dtype | None = None) -> mx.array:
    """The values the parts stand for, in `dtype` (default: MLX's, the scales' dtype or bfloat16)."""
    weight, scales, *biases = parts
    return mx.dequantize(weight, scales, biases[0] if biases else None, **quantization.describe(), dtype=dtype)


KINDS: tuple[str, ...] = tuple(dict.fromkeys(q.kind for q in AVAILABLE))
"""What the quantized test modules parametrize over: each mode, affine split by `Quantization.kind`."""


def first_of_kind(kind: str) -> Quantization:
    return next(q for q in AVAILABLE if q.kind == kind)


Parts = tuple[np.ndarray, ...]
"""A quantized weight as NumPy arrays: the packed weight, the scales (and the affine biases);
floating parts in float32, which holds the case dtype's values exactly."""


def to_mlx(parts: Parts, dtype: DType) -> tuple[mx.array, ...]:
    """The parts as MLX arrays, floating ones back in the case dtype."""
    return tuple(
        mx.array(part).astype(getattr(mx, dtype.name)) if part.dtype.kind == "f" else mx.array(part) for part in parts
    )


def quantize_base(weight: np.ndarray, dtype: DType, quantization: Quantization) -> tuple[Parts, np.ndarray]:
    """Quantize `weight` (values of `dtype`) as a quantized base would: its parts, and the values it holds.

    Re-quantizing dequantized values does not always give them back, so a case keeps the parts.
    """
    mlx_dtype = getattr(mx, dtype.name)
    values = mx.array(np.asarray(weight, dtype=np.float32)).astype(mlx_dtype)
    parts = quantize(values, quantization)
    readable = [p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p for p in parts]
    restored = dequantize(parts, quantization, mlx_dtype).astype(mx.float32)
    mx.eval(*readable, restored)  # at once: each evaluation is a hand-over to MLX's stream thread
    return tuple(np.array(p) for p in readable), np.array(restored, dtype=np.float64)
