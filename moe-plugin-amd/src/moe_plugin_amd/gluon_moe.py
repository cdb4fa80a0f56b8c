"""``amd.gluon.mxfp4``: the Gluon CDNA4 (gfx950) mxfp4 MoE, W4A16 (bf16) and W4A8 (fp8 e4m3 static).

One call (``apply``), all launches with shape-only grids and no host synchronisation:

1. ``moe_sorting`` (this plugin's Triton sorter, ``unit_size = BLOCK_M``): packed ids
   ``(slot << 24) | token``, weights, ``sorted_expert_ids`` (block -> local expert) and
   ``num_valid_ids``. ``sorted_expert_ids`` is the *active-expert remap*: built on the device,
   compact (experts without entries take no block), it maps each program row of the GEMM grids
   to its expert.
2. ``moe_gemm1`` on grid ``(I_PAD / BLOCK_N1, B)``: gathered rows x w13 (+ b13), gate and up
   tiles, fused silu / swiglu_oai, written per sorted row (bf16; fp8 for W4A8).
3. ``moe_gemm2`` on grid ``(H_PAD / BLOCK_N2, B)``: x w2 + b2, times the router weight, each
   row written to its own slot row ``t * k + s`` of a float32 ``[T*k, H]`` buffer.
4. ``moe_slot_sum`` on ``(T, ceil(H / 512))``: per token, the k slot rows summed in slot order
   (deterministic, no atomics), masked slots (experts of other ranks, out-of-range ids) skipped.

``B = active_blocks(T*k, E_local, BLOCK_M) = m + (T*k - m) // BLOCK_M`` with ``m = min(T*k,
E_local)``: the most blocks the sorter can fill when at most ``E_local`` experts are active,
so at decode (``T*k < E``) the grid covers ``T*k`` blocks, not ``E`` (programs past
``num_valid_ids[0]`` exit at once). Tiles come from :mod:`.gluon_configs`; the weight layout
from :mod:`.gluon_layout`; the kernels are in ``_details/_gluon_moe.py``; the tile-level torch
emulation that CPU CI runs against the reference is :mod:`.emulation`.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from moe_core import DeviceInfo, ExpertWeights, KernelEntry, MoESpec, PreparedWeights
from moe_core.sorting import SortedTokens, max_num_blocks

from ._common import PRIORITY_GLUON
from .gluon_configs import TileConfig, select_config
from .gluon_layout import PAD, pad_to, prepare_weights

__all__ = [
    "CAPABILITY",
    "SLOT_SUM_BLOCK",
    "active_blocks",
    "gluon_launches",
    "gluon_refusal",
    "kernel_entries",
]

CAPABILITY = "hip gfx950"
#: columns per program of moe_slot_sum
SLOT_SUM_BLOCK = 512
_ACTS = {"silu": 0, "swiglu_oai": 1}

Launch = tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]]


def active_blocks(num_entries: int, num_local_experts: int, block_m: int) -> int:
    """Grid rows of both GEMMs: the most sorted blocks ``num_entries`` entries fill on ``num_local_experts``."""
    return max_num_blocks(num_entries, num_local_experts, block_m)


def gluon_refusal() -> str | None:
    """Why the Gluon kernels cannot be built here (no Triton, or a Triton without Gluon's CDNA4 API)."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        from triton.experimental.gluon.language.amd import cdna4
    except ImportError as exc:
        return f"this triton has no Gluon CDNA4 API ({exc})"
    if not hasattr(cdna4, "mfma_scaled") or not hasattr(cdna4, "scaled_upcast"):
        return "this triton's Gluon CDNA4 API lacks mfma_scaled / scaled_upcast (triton >= 3.6 needed)"
    return None


def _supports(spec: MoESpec, device: DeviceInfo) -> str | None:
    reason = gluon_refusal()
    if reason:
        return reason
    if spec.dtype != torch.bfloat16:
        return f"activations must be bf16 (the W4A16 MFMA is bf16), not {spec.dtype}"
    if spec.quant.activation not in ("none", "fp8_per_tensor"):
        return f"mxfp4 activation mode {spec.quant.activation} not supported (none, fp8_per_tensor)"
    if spec.hidden_size % 32 or spec.intermediate_size % 32:
        return f"H={spec.hidden_size} and I={spec.intermediate_size} must be multiples of 32 (mxfp4 groups)"
    if spec.top_k >= 256:
        return f"top_k={spec.top_k}: the packed sorted ids hold slots < 256"
    return None


def _prepare(spec: MoESpec, weights: ExpertWeights, device: DeviceInfo) -> PreparedWeights:
    tensors = prepare_weights(spec, weights)
    meta = {
        "layout": "mxfp4 MFMA-B shuffle (16 rows x 128 K chunks), K-major e8m0",
        "pad": PAD,
        "h_pad": pad_to(spec.hidden_size),
        "i_pad": pad_to(spec.intermediate_size),
    }
    return PreparedWeights("amd.gluon.mxfp4", tensors, meta)


def gluon_launches(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    tensors: dict[str, torch.Tensor],
    sorted_tokens: SortedTokens,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
    tiles: TileConfig | None = None,
) -> list[Launch]:
    """The three Gluon launches for a non-empty call (buffers allocated here; works on ``meta``)."""
    from ._details import _gluon_moe as kernels

    T, k = topk_ids.shape
    H, inter = spec.hidden_size, spec.intermediate_size
    HP, IP = pad_to(H), pad_to(inter)
    tiles = tiles or select_config(T)
    fp8 = spec.quant.activation == "fp8_per_tensor"
    dev = hidden_states.device
    num_local = tensors["w13"].shape[0]
    rows = sorted_tokens.sorted_ids.shape[0]
    blocks = active_blocks(T * k, num_local, tiles.block_m)
    y = torch.empty(rows, IP, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16, device=dev)
    slots = torch.empty(T * k, H, dtype=torch.float32, device=dev)
    common = {"BLOCK_M": tiles.block_m, "A_FP8": fp8, "HAS_BIAS": spec.has_bias}
    g1, g2 = tiles.gemm1, tiles.gemm2
    alpha = float(spec.swiglu_alpha) if spec.swiglu_alpha is not None else 1.0
    limit = float(spec.swiglu_limit) if spec.swiglu_limit is not None else 0.0
    x = hidden_states
    gemm1 = (
        kernels.moe_gemm1,
        (IP // g1.block_n, blocks),
        (
            x,
            tensors["w13"],
            tensors["w13_scale"],
            tensors["b13"],
            y,
            sorted_tokens.sorted_ids,
            sorted_tokens.sorted_expert_ids,
            sorted_tokens.num_valid_ids,
            tensors["a13_scale"],
            tensors["a2_scale"],
            T,
            H,
            x.stride(0),
            alpha,
            limit,
        ),
        {
            "N_PAD": IP,
            "K_PAD": HP,
            "BLOCK_N": g1.block_n,
            "BLOCK_K": tiles.block_k(HP),
            "WARPS_M": g1.warps_m,
            "ACTIVATION": _ACTS[spec.activation],
            "num_warps": g1.num_warps,
            "STAGES": g1.stages,
            **common,
        },
    )
    gemm2 = (
        kernels.moe_gemm2,
        (HP // g2.block_n, blocks),
        (
            y,
            tensors["w2"],
            tensors["w2_scale"],
            tensors["b2"],
            slots,
            sorted_tokens.sorted_ids,
            sorted_tokens.sorted_weights,
            sorted_tokens.sorted_expert_ids,
            sorted_tokens.num_valid_ids,
            tensors["a2_scale"],
            T,
            H,
            k,
        ),
        {
            "N_PAD": HP,
            "K_PAD": IP,
            "BLOCK_N": g2.block_n,
            "BLOCK_K": tiles.block_k(IP),
            "WARPS_M": g2.warps_m,
            "num_warps": g2.num_warps,
            "STAGES": g2.stages,
            **common,
        },
    )
    reduce = (
        kernels.moe_slot_sum,
        (T, -(-H // SLOT_SUM_BLOCK)),
        (slots, topk_ids, tensors["local_map"], out, H, spec.num_experts),
        {"TOP_K": k, "BLOCK_H": SLOT_SUM_BLOCK, "num_warps": 2},
    )
    return [gemm1, gemm2, reduce]


def sort_tokens(
    spec: MoESpec, topk_ids: torch.Tensor, topk_weights: torch.Tensor, tiles: TileConfig, tensors
):
    """This plugin's Triton moe_sorting with ``unit_size = BLOCK_M`` and the EP mask of ``tensors``."""
    from .sorting import moe_sorting_triton

    mask = tensors["expert_mask"] if spec.is_expert_parallel else None
    return moe_sorting_triton(
        topk_ids, topk_weights, num_experts=spec.num_experts, unit_size=tiles.block_m, expert_mask=mask
    )


def _apply(
    spec: MoESpec,
    hidden_states: torch.Tensor,
    prepared: PreparedWeights,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    out: torch.Tensor,
) -> None:
    tiles = select_config(topk_ids.shape[0])
    sorted_tokens = sort_tokens(spec, topk_ids, topk_weights, tiles, prepared.tensors)
    launches = gluon_launches(spec, hidden_states, prepared.tensors, sorted_tokens, topk_ids, out, tiles)
    for kernel, grid, args, kwargs in launches:
        kernel[grid](*args, **kwargs)


def kernel_entries() -> list[KernelEntry]:
    """``amd.gluon.mxfp4`` (gfx950 only: CDNA4 scaled MFMA / scaled convert)."""
    return [
        KernelEntry(
            name="amd.gluon.mxfp4",
            family="experts",
            apply=_apply,
            prepare=_prepare,
            supports=_supports,
            quant=frozenset({"mxfp4"}),
            activations=frozenset(_ACTS),
            features=frozenset({"bias", "expert_parallel"}),
            capability=CAPABILITY,
            priority=PRIORITY_GLUON,
            description="Gluon CDNA4 mxfp4 MoE: W4A16 (scaled convert + bf16 MFMA), W4A8 fp8 static "
            "(scaled MFMA); pre-shuffled weights, sorted-block grid, deterministic slot sum",
        )
    ]
