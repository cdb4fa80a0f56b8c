"""Helpers for testing kernels against the reference: random layers, errors, bounds.

Used by this repository's tests, by ``moe run``, and by third-party plugin
authors checking their kernels (``from moe_core.testing import ...``).
"""

from __future__ import annotations

import math

import torch

from . import quant as q
from .routing import RoutingSpec, select_experts
from .spec import ExpertWeights, MoESpec

__all__ = [
    "TOLERANCES",
    "random_expert_weights",
    "random_logits",
    "random_routing",
    "relative_error",
    "tolerance",
]

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


def _generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def random_expert_weights(
    spec: MoESpec,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    quantize: bool = True,
) -> ExpertWeights:
    """Random canonical weights for ``spec`` (this rank's experts), never zeros.

    Values are ``N(0, 1/fan_in)`` so outputs stay O(1); biases ``N(0, 0.1)``.
    With ``quantize`` and a quantized ``spec.quant`` they are quantized with
    the reference quantizer (static activation scales set from the data's
    expected range); otherwise they are returned in ``spec.dtype`` (float32 for
    quantized schemes).
    """
    device = torch.device(device)
    gen = _generator(seed, device)
    L, H, inter, N1 = spec.num_local_experts, spec.hidden_size, spec.intermediate_size, spec.w13_rows
    high = spec.dtype if not spec.quant.is_quantized else torch.float32

    def randn(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device) * std).to(high)

    weights = ExpertWeights(w13=randn(L, N1, H, std=H**-0.5), w2=randn(L, H, inter, std=inter**-0.5))
    if spec.has_bias:
        weights.b13 = randn(L, N1, std=0.1)
        weights.b2 = randn(L, H, std=0.1)
    if spec.quant.static_activation_scale:
        # inputs are N(0, 1): 4.5 sigma at the top of the fp8 range; GEMM-1 outputs similar
        weights.a13_scale = torch.tensor(4.5 / q.FP8_MAX, device=device)
        weights.a2_scale = torch.tensor(4.5 / q.FP8_MAX, device=device)
    if quantize and spec.quant.is_quantized:
        weights = q.quantize_weights(weights, spec.quant)
    return weights


def random_logits(
    num_tokens: int,
    num_experts: int,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Router logits ``[T, E]``, ``N(0, 1)``: a roughly uniform expert load."""
    gen = _generator(seed, torch.device(device))
    return torch.randn(num_tokens, num_experts, generator=gen, device=device).to(dtype)


def random_routing(
    routing: RoutingSpec,
    num_tokens: int,
    num_experts: int,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``select_experts`` on random logits (and a random correction bias when grouped)."""
    logits = random_logits(num_tokens, num_experts, device=device, seed=seed)
    bias = None
    if routing.method == "biased_grouped":
        bias = random_logits(1, num_experts, device=device, seed=seed + 1)[0] * 0.1
    return select_experts(logits, routing, correction_bias=bias)
