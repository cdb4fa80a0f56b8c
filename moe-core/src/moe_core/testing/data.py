"""Random layers for tests: canonical weights (quantized with :mod:`moe_core.quant`), logits, routing."""

from __future__ import annotations

import torch

from .. import quant as q
from ..routing import RoutingSpec, select_experts
from ..spec import ExpertWeights, MoESpec

__all__ = ["random_expert_weights", "random_logits", "random_routing"]


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
