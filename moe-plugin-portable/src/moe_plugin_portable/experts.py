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

from typing import Any, NamedTuple

import torch

from moe_core import DeviceInfo, ExpertWeights, KernelEntry, MoESpec, PreparedWeights
from moe_core.sorting import align_block_size

from ._common import PRIORITY, interpreting, triton_refusal
from .configs import GemmConfig, MoEConfig, lookup_config

__all__ = [
    "Launch",
    "SortedBlocks",
    "combine_launch",
    "fused_moe",
    "fused_moe_launches",
    "gemm1_launch",
    "gemm2_launch",
    "kernel_entries",
    "launch_combine",
    "launch_gemm1",
    "launch_gemm2",
    "sort_tokens",
]

_ACTIVATIONS = ("silu", "gelu", "swiglu_oai", "relu2")
_COMBINE_BLOCK = 1024

#: One kernel launch, described without running it: ``(kernel, grid, args, kwargs)``;
#: ``kernel[grid](*args, **kwargs)`` runs it (``moe_plugin_portable.profile`` compiles it offline).
Launch = tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]]


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


class SortedBlocks(NamedTuple):
    """``align_block_size`` output for one ``block_m``."""

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    block_m: int


def sort_tokens(
    spec: MoESpec, topk_ids: torch.Tensor, tensors: dict[str, torch.Tensor], block_m: int
) -> SortedBlocks:
    """Group the (token, slot) entries by local expert in blocks of ``block_m``."""
    sorted_ids, expert_ids, num_padded = align_block_size(
        topk_ids, num_experts=spec.num_experts, block_size=block_m, expert_map=tensors.get("expert_map")
    )
    return SortedBlocks(sorted_ids, expert_ids, num_padded, block_m)


def launch_gemm1(
    spec: MoESpec,
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    blocks: SortedBlocks,
    topk_weights: torch.Tensor,
    cfg: GemmConfig,
    inter_buf: torch.Tensor,
) -> None:
    """``inter_buf[p] = act(x[token(p)] @ w13[e].T + b13[e])`` at every valid sorted position ``p``."""
    _run(gemm1_launch(spec, x, tensors, blocks, topk_weights, cfg, inter_buf))


def gemm1_launch(
    spec: MoESpec,
    x: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    blocks: SortedBlocks,
    topk_weights: torch.Tensor,
    cfg: GemmConfig,
    inter_buf: torch.Tensor,
    *,
    interpret: bool | None = None,
) -> Launch:
    """The launch of :func:`launch_gemm1` (``interpret``: for the interpreter; default: as now)."""
    from ._details import _fused_moe as kernels

    H, inter = spec.hidden_size, spec.intermediate_size
    w13, b13 = tensors["w13"], tensors.get("b13")
    grid = (blocks.expert_ids.numel() * triton_cdiv(inter, cfg.block_n),)
    args = (
        x,
        w13,
        b13 if b13 is not None else w13,
        inter_buf,
        blocks.sorted_ids,
        blocks.expert_ids,
        blocks.num_padded,
        topk_weights,
        x.shape[0] * spec.top_k,
        H,
        inter,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        b13.stride(0) if b13 is not None else 0,
        inter_buf.stride(0),
        float(spec.swiglu_alpha or 0.0),
        float(spec.swiglu_limit or 0.0),
    )
    kwargs = dict(
        TOP_K=spec.top_k,
        GATED=spec.is_gated,
        ACTIVATION=kernels.ACTIVATIONS[spec.activation],
        HAS_BIAS=b13 is not None,
        WEIGHT_ON_INPUT=spec.apply_router_weight_on_input,
        BLOCK_M=blocks.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EVEN_K=H % cfg.block_k == 0,
        # the interpreter multiplies bf16 as integers
        UPCAST=interpreting() if interpret is None else interpret,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return kernels.moe_gemm1, grid, args, kwargs


def launch_gemm2(
    spec: MoESpec,
    inter_buf: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    blocks: SortedBlocks,
    topk_weights: torch.Tensor,
    cfg: GemmConfig,
    y: torch.Tensor,
    row_is_token: bool,
) -> None:
    """``y[entry(p)] = w(p) * (inter_buf[p] @ w2[e].T + b2[e])`` (row ``token`` when ``row_is_token``)."""
    _run(gemm2_launch(spec, inter_buf, tensors, blocks, topk_weights, cfg, y, row_is_token))


def gemm2_launch(
    spec: MoESpec,
    inter_buf: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    blocks: SortedBlocks,
    topk_weights: torch.Tensor,
    cfg: GemmConfig,
    y: torch.Tensor,
    row_is_token: bool,
    *,
    interpret: bool | None = None,
) -> Launch:
    """The launch of :func:`launch_gemm2` (``interpret``: for the interpreter; default: as now)."""
    from ._details import _fused_moe as kernels

    H, inter = spec.hidden_size, spec.intermediate_size
    w2, b2 = tensors["w2"], tensors.get("b2")
    grid = (blocks.expert_ids.numel() * triton_cdiv(H, cfg.block_n),)
    args = (
        inter_buf,
        w2,
        b2 if b2 is not None else w2,
        y,
        blocks.sorted_ids,
        blocks.expert_ids,
        blocks.num_padded,
        topk_weights,
        topk_weights.numel(),
        inter,
        H,
        inter_buf.stride(0),
        w2.stride(0),
        w2.stride(1),
        b2.stride(0) if b2 is not None else 0,
        y.stride(0),
    )
    kwargs = dict(
        TOP_K=spec.top_k,
        HAS_BIAS=b2 is not None,
        APPLY_WEIGHT=not spec.apply_router_weight_on_input,
        ROW_IS_TOKEN=row_is_token,
        BLOCK_M=blocks.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EVEN_K=inter % cfg.block_k == 0,
        UPCAST=interpreting() if interpret is None else interpret,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return kernels.moe_gemm2, grid, args, kwargs


def launch_combine(
    spec: MoESpec,
    y: torch.Tensor,
    topk_ids: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    out: torch.Tensor,
) -> None:
    """``out[t] = sum of y[t * k + j]`` over the slots ``j`` whose expert is local."""
    _run(combine_launch(spec, y, topk_ids, tensors, out))


def combine_launch(
    spec: MoESpec,
    y: torch.Tensor,
    topk_ids: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    out: torch.Tensor,
) -> Launch:
    """The launch of :func:`launch_combine`."""
    from ._details import _fused_moe as kernels

    T, H = out.shape
    emap = tensors.get("expert_map")
    block = min(_COMBINE_BLOCK, max(128, 1 << (H - 1).bit_length()))
    args = (y, out, topk_ids, emap if emap is not None else topk_ids, H, spec.num_experts)
    kwargs = dict(TOP_K=spec.top_k, HAS_MAP=emap is not None, BLOCK_N=block, num_warps=4)
    return kernels.moe_combine, (T, triton_cdiv(H, block)), args, kwargs


def _run(launch: Launch) -> None:
    kernel, grid, args, kwargs = launch
    kernel[grid](*args, **kwargs)


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
    cfg = config or lookup_config(spec, hidden_states.shape[0], hidden_states.device)
    topk_weights = topk_weights.contiguous()
    topk_ids = topk_ids.contiguous()
    blocks = sort_tokens(spec, topk_ids, tensors, cfg.block_m)
    for launch in fused_moe_launches(spec, hidden_states, tensors, topk_weights, topk_ids, out, cfg, blocks):
        _run(launch)
    return out


def fused_moe_launches(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    cfg: MoEConfig,
    blocks: SortedBlocks,
    *,
    interpret: bool | None = None,
) -> list[Launch]:
    """The launches of :func:`fused_moe` after sorting, in order (allocates their buffers, runs nothing)."""
    T, H = hidden_states.shape
    device = hidden_states.device
    inter_buf = torch.empty(
        blocks.sorted_ids.numel(), spec.intermediate_size, dtype=hidden_states.dtype, device=device
    )
    launches = [
        gemm1_launch(
            spec, hidden_states, tensors, blocks, topk_weights, cfg.gemm1, inter_buf, interpret=interpret
        )
    ]
    direct = spec.top_k == 1 and "expert_map" not in tensors
    y = out if direct else torch.empty(T * spec.top_k, H, dtype=out.dtype, device=device)
    launches.append(
        gemm2_launch(
            spec, inter_buf, tensors, blocks, topk_weights, cfg.gemm2, y, direct, interpret=interpret
        )
    )
    if not direct:
        launches.append(combine_launch(spec, y, topk_ids, tensors, out))
    return launches


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
