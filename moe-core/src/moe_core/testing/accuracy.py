"""How close a kernel must be to the float64 reference: :func:`relative_error` and :func:`tolerance`."""

from __future__ import annotations

import math

import torch

from ..spec import MoESpec

__all__ = ["TOLERANCES", "relative_error", "tolerance"]

#: Bound on ``relative_error(kernel, float64 reference)`` by activation dtype, for
#: unquantized schemes: one rounding of the GEMM-1 activation and of the output
#: to the dtype (unit roundoff 2**-8 for bf16, 2**-11 for fp16), with headroom.
TOLERANCES: dict[torch.dtype, float] = {
    torch.bfloat16: 1.6e-2,
    torch.float16: 2.5e-3,
    torch.float32: 1e-4,
}

#: Extra bound by activation-quantization mode: a kernel may round a few
#: quantized activations to the neighbouring code (fp8 e4m3 spacing 2**-3
#: relative, e2m1 2**-1), which the reference's own quantization cannot mirror.
_ACT_TOLERANCE = {
    "none": 0.0,
    "fp8_per_token": 3e-2,
    "fp8_per_tensor": 3e-2,
    "fp8_group": 3e-2,
    "nvfp4": 8e-2,
}


def tolerance(spec: MoESpec) -> float:
    """Relative-error bound for a kernel of ``spec`` against the float64 reference."""
    return TOLERANCES[spec.dtype] + _ACT_TOLERANCE[spec.quant.activation]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (0 for two empty tensors).

    ``inf`` if ``actual`` has a NaN or inf, so a poisoned output never passes.
    """
    a, e = actual.double(), expected.double()
    if a.numel() == 0 and e.numel() == 0:
        return 0.0
    if not torch.isfinite(a).all():
        return math.inf
    denom = e.norm().item()
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else (0.0 if diff == 0 else math.inf)
