"""The floating-point formats a case can be drawn in, with the numbers the verdict needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DType:
    name: str
    unit_roundoff: float
    """Half the distance from 1 to the next representable number: the relative error of one rounding."""
    smallest_subnormal: float
    smallest_normal: float
    largest: float
    torch: torch.dtype
    flushes_in_dot_products: bool = False
    """Dot-product instructions of this dtype treat subnormal operands as zero and flush subnormal results:
    bfloat16's do (x86 AVX512_BF16's VDPBF16PS and AMX, Arm's BFDOT and BFMMLA), and torch's CPU matmul uses them."""

    @property
    def underflow(self) -> float:
        """The largest absolute error of one rounding into the subnormal range."""
        return self.smallest_subnormal / 2

    @property
    def dot_product_underflow(self) -> float:
        """The same where a dot product of this dtype's numbers meets a subnormal one (an operand or its result):
        where its dot products flush subnormals, one may become zero, an error up to the smallest normal number."""
        return self.smallest_normal if self.flushes_in_dot_products else self.underflow

    def __str__(self) -> str:
        return self.name

    __repr__ = __str__

    def _repr_pretty_(self, printer, cycle) -> None:  # how Hypothesis and IPython print it
        printer.text(repr(self))


def _describe(name: str, torch_dtype: torch.dtype, flushes_in_dot_products: bool = False) -> DType:
    info = torch.finfo(torch_dtype)
    return DType(
        name=name,
        unit_roundoff=info.eps / 2,
        smallest_subnormal=info.smallest_normal * info.eps,
        smallest_normal=info.smallest_normal,
        largest=info.max,
        torch=torch_dtype,
        flushes_in_dot_products=flushes_in_dot_products,
    )


FLOAT32 = _describe("float32", torch.float32)
FLOAT16 = _describe("float16", torch.float16)
BFLOAT16 = _describe("bfloat16", torch.bfloat16, flushes_in_dot_products=True)

CASE_DTYPES: tuple[DType, ...] = (FLOAT32, FLOAT16, BFLOAT16)
BY_NAME = {dtype.name: dtype for dtype in CASE_DTYPES}

ACCUMULATION = FLOAT32
"""Matrix products of half-precision operands are accumulated at least in float32.

This holds for MLX (CPU and Metal) and for torch on the CPU; ``tests/meta_tests`` measures it on
the machine that runs the suite, because the whole error model rests on it.
"""


def promoted(*dtypes: DType) -> DType:
    """The dtype an operation on operands of these dtypes computes in, as torch and MLX promote them: the one
    dtype they share, else float32 (float16 with bfloat16, or either with float32)."""
    return dtypes[0] if all(d == dtypes[0] for d in dtypes) else FLOAT32


def round_to(values: np.ndarray, dtype: DType) -> np.ndarray:
    """Round float64 values to the nearest `dtype` numbers and return them as float64 (exact there)."""
    if dtype.torch == torch.float32:  # numpy's conversion is torch's, without its overhead
        with np.errstate(over="ignore"):  # beyond float32's range: inf, as torch gives
            return np.asarray(values, dtype=np.float64).astype(np.float32).astype(np.float64)
    array = np.ascontiguousarray(values, dtype=np.float64)
    if not array.flags.writeable:  # a case's own arrays are read-only (`cases.read_only`), which torch warns of
        array = array.copy()
    rounded = torch.from_numpy(array).to(dtype.torch)
    return rounded.to(torch.float64).numpy()
