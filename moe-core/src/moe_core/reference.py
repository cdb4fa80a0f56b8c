"""The reference backend: pure-torch kernels for every op, on any device.

It is the embedded default on machines without a GPU plugin, the oracle of
every test, and the last fallback. Experts are computed grouped by expert (one
matmul pair per active expert, no per-token loop), in ``compute_dtype``
(float32 by default; float64 for test oracles), after dequantizing the
weights and modelling the scheme's activation quantization
(:func:`moe_core.quant.fake_quantize_activation`) at both GEMM inputs.

The reference reads per-expert token counts on the host, so on a GPU it
synchronises once per call: it is an oracle and a fallback, not a fast path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import quant as q
from .hookspecs import hookimpl
from .registry import KernelEntry
from .spec import ACTIVATIONS, QUANT_SCHEMES, ExpertWeights, MoESpec

__all__ = ["activation_reference", "fused_experts_reference", "register_kernels"]


def activation_reference(h: torch.Tensor, spec: MoESpec) -> torch.Tensor:
    """Apply ``spec.activation`` to GEMM-1 output ``h [M, w13_rows]`` -> ``[M, I]``."""
    if spec.activation == "relu2":
        return torch.square(F.relu(h))
    inter = spec.intermediate_size
    gate, up = h[:, :inter], h[:, inter:]
    if spec.activation == "silu":
        return F.silu(gate) * up
    if spec.activation == "gelu":
        return F.gelu(gate) * up
    limit, alpha = spec.swiglu_limit, spec.swiglu_alpha
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(alpha * gate) * (up + 1)


def _expert_weight(
    weights: ExpertWeights, which: str, e: int, spec: MoESpec, dtype: torch.dtype
) -> torch.Tensor:
    w = getattr(weights, which)[e]
    if q.is_high_precision(w):
        return w.to(dtype)
    scale = getattr(weights, f"{which}_scale")
    gscale = getattr(weights, f"{which}_global_scale")
    return q.dequantize_tensor(
        w, scale[e] if scale is not None else None, gscale[e] if gscale is not None else None, spec.quant
    ).to(dtype)


def fused_experts_reference(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    weights: ExpertWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    *,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The MoE layer's experts: ``[T, H]`` in ``compute_dtype``.

    ``out[t] = sum_j w[t, j] * down(act(up_gate(x[t])))`` over the slots ``j``
    whose expert is local (per ``spec``'s expert map); with
    ``apply_router_weight_on_input`` the weight scales ``x[t]`` instead.
    ``weights`` are canonical, quantized per ``spec.quant`` or high precision.
    """
    T, H = hidden_states.shape
    k = topk_ids.shape[1]
    device = hidden_states.device
    out = torch.zeros(T, H, dtype=compute_dtype, device=device)
    if T == 0:
        return out
    ids = topk_ids.reshape(-1).long()
    emap = spec.expert_map_tensor(device)
    local = emap.long()[ids] if emap is not None else ids
    num_local = spec.num_local_experts
    local = torch.where((local >= 0) & (local < num_local), local, num_local)  # num_local = dropped
    order = torch.argsort(local, stable=True)
    counts = torch.bincount(local, minlength=num_local + 1)[:num_local].tolist()
    tokens = order // k
    route_w = topk_weights.reshape(-1)[order].to(compute_dtype)
    x = hidden_states[tokens].to(compute_dtype)
    if spec.apply_router_weight_on_input:
        x = x * route_w[:, None]
    x = q.fake_quantize_activation(x, spec.quant, weights.a13_scale).to(compute_dtype)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        h = x[rows] @ _expert_weight(weights, "w13", e, spec, compute_dtype).T
        if weights.b13 is not None:
            h = h + weights.b13[e].to(compute_dtype)
        a = activation_reference(h, spec)
        a = q.fake_quantize_activation(a, spec.quant, weights.a2_scale).to(compute_dtype)
        o = a @ _expert_weight(weights, "w2", e, spec, compute_dtype).T
        if weights.b2 is not None:
            o = o + weights.b2[e].to(compute_dtype)
        if not spec.apply_router_weight_on_input:
            o = o * route_w[rows, None]
        out.index_add_(0, tokens[rows], o)
    return out


def _prepare(spec: MoESpec, weights: ExpertWeights, device: object) -> dict[str, torch.Tensor]:
    if spec.quant.is_quantized and q.is_high_precision(weights.w13):
        weights = q.quantize_weights(weights, spec.quant)
    return weights.tensors()


def _apply(spec, hidden_states, prepared, topk_weights, topk_ids, out) -> None:
    weights = ExpertWeights(**prepared.tensors)
    out.copy_(fused_experts_reference(spec, hidden_states, weights, topk_weights, topk_ids))


@hookimpl
def register_kernels(register) -> None:
    from .routing import ROUTING_METHODS, select_experts_reference
    from .sorting import align_block_size_reference, moe_sorting_reference, ragged_metadata_reference

    register(
        KernelEntry(
            name="reference.torch.experts",
            family="experts",
            apply=_apply,
            prepare=_prepare,
            quant=frozenset(QUANT_SCHEMES),
            activations=frozenset(ACTIVATIONS),
            features=frozenset({"bias", "expert_parallel", "router_weight_on_input"}),
            capability="any",
            priority=0,
            needs_contiguous=False,
            description="pure torch, grouped by expert, float32 accumulation (any device; syncs on GPU)",
        )
    )
    register(
        KernelEntry(
            name="reference.torch.routing",
            family="routing",
            apply=select_experts_reference,
            features=frozenset({*ROUTING_METHODS, "fused_shared_experts"}),
            description="pure torch routing, float32",
        )
    )
    for op, fn in (
        ("align_block_size", align_block_size_reference),
        ("moe_sorting", moe_sorting_reference),
        ("ragged_metadata", ragged_metadata_reference),
    ):
        register(
            KernelEntry(
                name=f"reference.torch.{op}",
                family="sorting",
                op=op,
                apply=fn,
                features=frozenset({"expert_map"}),
                description=f"pure torch {op}",
            )
        )
