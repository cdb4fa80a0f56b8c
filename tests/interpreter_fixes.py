"""Float down-conversions of Triton's CPU interpreter made to round as the GPUs do (tests only).

The interpreter's ``_convert_float`` (Triton 3.6 to 3.9) truncates float32 -> bf16 (``x.to(tl.bfloat16)``
reaches it without a rounding mode) and, under round-to-nearest, adds the cut-off bit without
carrying into the exponent (float32 -> e4m3 of 124.8 gives 64, not 128) nor breaking ties to even.
The GPUs round to nearest even (NVIDIA ``cvt.rn``, and ``satfinite`` for fp8; AMD the same), so
:func:`install` replaces the conversions between float32 / float16 / bf16 / e4m3 / e5m2 by torch's
(round to nearest even; fp8 saturating at its largest finite value, NaN kept), except where a kernel
asks for round-toward-zero. Everything else goes to the interpreter's own.
"""

from __future__ import annotations

import numpy as np
import torch
import triton.language as tl
from triton._C.libtriton import ir
from triton.runtime import interpreter

__all__ = ["install"]

_TORCH = {
    tl.float32: torch.float32,
    tl.float16: torch.float16,
    tl.bfloat16: torch.bfloat16,
    tl.float8e4nv: torch.float8_e4m3fn,
    tl.float8e5: torch.float8_e5m2,
}
_BITS = {32: (np.float32, torch.float32), 16: (np.int16, torch.int16), 8: (np.uint8, torch.uint8)}
_FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def _from_numpy(data: np.ndarray, dtype: tl.dtype) -> torch.Tensor:
    np_type, torch_type = _BITS[dtype.primitive_bitwidth]
    raw = torch.from_numpy(np.ascontiguousarray(data).view(np_type).copy()).view(torch_type)
    return raw.view(_TORCH[dtype])


def _rounded(original):
    def convert(data, input_dtype, output_dtype, rounding_mode):
        if (
            input_dtype not in _TORCH
            or output_dtype not in _TORCH
            or rounding_mode == ir.ROUNDING_MODE.RTZ
            or output_dtype.primitive_bitwidth > input_dtype.primitive_bitwidth
        ):
            return original(data, input_dtype, output_dtype, rounding_mode)
        src = _from_numpy(data, input_dtype)
        dst = _TORCH[output_dtype]
        if dst in _FP8_MAX:  # saturate finite values (NaN stays NaN)
            src = src.float().clamp(-_FP8_MAX[dst], _FP8_MAX[dst])
        out = src.to(dst)
        width = output_dtype.primitive_bitwidth
        bits = out.view(_BITS[width][1]).numpy()
        return bits.view(getattr(np, f"uint{width}")).reshape(np.shape(data))

    convert.original = original
    return convert


def install() -> None:
    """Patch the interpreter (idempotent)."""
    if not hasattr(interpreter._convert_float, "original"):
        interpreter._convert_float = _rounded(interpreter._convert_float)
