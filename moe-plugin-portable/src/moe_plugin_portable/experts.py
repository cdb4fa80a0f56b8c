"""The portable fused MoE (family ``experts``): Triton grouped GEMMs on expert-sorted tokens.

``portable.triton.fused_moe`` runs, for ``T`` tokens and ``k`` slots:

1. ``align_block_size`` (the sorting contract; this plugin's Triton kernel on
   a GPU) with ``block_m`` from the config for ``T``;
2. GEMM 1 with bias and activation fused in its epilogue (gate and up in one
   program), written at the sorted positions;
3. GEMM 2 with bias and router weight fused, one row per (token, slot);
4. a deterministic combine over the ``k`` slots (skipped when ``k == 1``
   without expert parallelism: GEMM 2 then writes the output directly).

No float atomics, no host synchronisation; every launch size is a function
of ``T`` alone, so the layer captures in a CUDA graph. Weights stay in the
canonical layout (``prepare`` makes them contiguous and moves the expert map
to the device). bf16 and fp16 here; quantized weights slot into the weight
tile load of the kernels (``_details/_fused_moe.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from moe_core import DeviceInfo, ExpertWeights, KernelEntry, MoESpec, PreparedWeights
from moe_core.sorting import align_block_size

from ._common import PRIORITY, interpreting, triton_refusal
from .configs import MoEConfig, lookup_config

__all__ = ["fused_moe", "kernel_entries"]

_ACTIVATIONS = ("silu", "gelu", "swiglu_oai", "relu2")
_COMBINE_BLOCK = 1024


def _supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    reason = triton_refusal(device)
    if reason:
        return reason
    if spec.quant.weight_dtype != spec.dtype:
        return f"weights ({spec.quant.name}) and activations ({spec.dtype}) must share a dtype"
    return None


def _prepare(spec: MoESpec, weights: ExpertWeights, device: DeviceInfo) -> dict[str, torch.Tensor]:
    tensors = {name: t.contiguous() for name, t in weights.tensors().items()}
    emap = spec.expert_map_tensor(weights.device)
    if emap is not None:
        tensors["expert_map"] = emap
    return tensors


def fused_moe(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    config: MoEConfig | None = None,
) -> torch.Tensor:
    """Run the fused MoE into ``out [T, H]``; ``config`` overrides the table/heuristic (tuning)."""
    from ._details import _fused_moe as kernels

    T, H = hidden_states.shape
    k, inter = spec.top_k, spec.intermediate_size
    device = hidden_states.device
    cfg = config or lookup_config(spec, T, device)
    topk_weights = topk_weights.contiguous()
    topk_ids = topk_ids.contiguous()
    emap = tensors.get("expert_map")
    sorted_ids, expert_ids, num_padded = align_block_size(
        topk_ids, num_experts=spec.num_experts, block_size=cfg.block_m, expert_map=emap
    )
    m_blocks = expert_ids.numel()
    w13, w2 = tensors["w13"], tensors["w2"]
    b13, b2 = tensors.get("b13"), tensors.get("b2")

    upcast = interpreting()  # the interpreter multiplies bf16 as integers
    inter_buf = torch.empty(sorted_ids.numel(), inter, dtype=hidden_states.dtype, device=device)
    c1 = cfg.gemm1
    kernels.moe_gemm1[(m_blocks * triton_cdiv(inter, c1.block_n),)](
        hidden_states,
        w13,
        b13 if b13 is not None else w13,
        inter_buf,
        sorted_ids,
        expert_ids,
        num_padded,
        topk_weights,
        T * k,
        H,
        inter,
        hidden_states.stride(0),
        w13.stride(0),
        w13.stride(1),
        b13.stride(0) if b13 is not None else 0,
        inter_buf.stride(0),
        float(spec.swiglu_alpha or 0.0),
        float(spec.swiglu_limit or 0.0),
        TOP_K=k,
        GATED=spec.is_gated,
        ACTIVATION=kernels.ACTIVATIONS[spec.activation],
        HAS_BIAS=b13 is not None,
        WEIGHT_ON_INPUT=spec.apply_router_weight_on_input,
        BLOCK_M=cfg.block_m,
        BLOCK_N=c1.block_n,
        BLOCK_K=c1.block_k,
        GROUP_M=c1.group_m,
        EVEN_K=H % c1.block_k == 0,
        UPCAST=upcast,
        num_warps=c1.num_warps,
        num_stages=c1.num_stages,
    )

    direct = k == 1 and emap is None
    y = out if direct else torch.empty(T * k, H, dtype=out.dtype, device=device)
    c2 = cfg.gemm2
    kernels.moe_gemm2[(m_blocks * triton_cdiv(H, c2.block_n),)](
        inter_buf,
        w2,
        b2 if b2 is not None else w2,
        y,
        sorted_ids,
        expert_ids,
        num_padded,
        topk_weights,
        T * k,
        inter,
        H,
        inter_buf.stride(0),
        w2.stride(0),
        w2.stride(1),
        b2.stride(0) if b2 is not None else 0,
        y.stride(0),
        TOP_K=k,
        HAS_BIAS=b2 is not None,
        APPLY_WEIGHT=not spec.apply_router_weight_on_input,
        ROW_IS_TOKEN=direct,
        BLOCK_M=cfg.block_m,
        BLOCK_N=c2.block_n,
        BLOCK_K=c2.block_k,
        GROUP_M=c2.group_m,
        EVEN_K=inter % c2.block_k == 0,
        UPCAST=upcast,
        num_warps=c2.num_warps,
        num_stages=c2.num_stages,
    )
    if not direct:
        block = min(_COMBINE_BLOCK, max(128, 1 << (H - 1).bit_length()))
        kernels.moe_combine[(T, triton_cdiv(H, block))](
            y,
            out,
            topk_ids,
            emap if emap is not None else topk_ids,
            H,
            spec.num_experts,
            TOP_K=k,
            HAS_MAP=emap is not None,
            BLOCK_N=block,
            num_warps=4,
        )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _apply(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    fused_moe(spec, hidden_states, prepared.tensors, topk_weights, topk_ids, out)


def kernel_entries() -> list[Any]:
    """The experts kernels of this plugin."""
    return [
        KernelEntry(
            name="portable.triton.fused_moe",
            family="experts",
            apply=_apply,
            prepare=_prepare,
            supports=_supports,
            quant=frozenset({"bf16", "fp16"}),
            activations=frozenset(_ACTIVATIONS),
            features=frozenset({"bias", "expert_parallel", "router_weight_on_input"}),
            capability="any",
            priority=PRIORITY,
            description="Triton fused MoE: sorted grouped GEMMs, fused activation/bias/router weight, "
            "deterministic combine",
        )
    ]
