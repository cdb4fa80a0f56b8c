"""``amd.triton.moe_sorting``: the aiter/CK ``moe_sorting`` contract as a multi-path Triton counting sort.

The contract is :func:`moe_core.sorting.moe_sorting` (ids packed
``(slot << 24) | token``, padding token ``T`` slot 0 weight 0, units of
``unit_size`` ordered by local expert, ``sorted_expert_ids`` per unit,
``num_valid_ids = [padded total, T]``, ``expert_mask`` with local numbering).
Results are bit-identical to :func:`moe_core.sorting.moe_sorting_reference`
(entries of one expert in ascending flat index).

As in FlyDSL's and CK's sorting, the path follows the token count ``T``; each
path has a fixed number of launches whose grids depend on the shapes only, no
host synchronisation, and only ``torch.empty`` allocations, so every call
captures in a CUDA graph (kernels in ``_details/_sorting.py``):

============  ====================  =====================================================
path          ``T``                 launches
============  ====================  =====================================================
``oneshot``   ``<= ONESHOT_MAX``    1: ``sort_oneshot`` (histogram + prefix sum in registers,
                                    program 0 places the entries, all programs fill units)
``expert``    ``<= EXPERT_MAX``     2: ``sort_expert_count``, ``sort_expert_scatter``
                                    (a program per expert: count; prefix + scatter)
``tiled``     larger                3: ``sort_tile_count`` (per tile), ``sort_tile_prefix``
                                    (scan per expert column), ``sort_tile_scatter``
============  ====================  =====================================================

The thresholds and tile sizes are module constants, read at each call (tests
lower them so that small ``T`` runs every path). ``T == 0`` returns the
reference's empty result without launching anything. Importing this module
imports no Triton.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch

from moe_core import DeviceInfo, KernelEntry
from moe_core.sorting import (
    SortedTokens,
    SortingRequest,
    max_num_blocks,
    moe_sorting_reference,
    single_program_refusal,
)

from ._common import PRIORITY_SORTING, PRIORITY_SORTING_HIP

__all__ = [
    "CHUNK",
    "EXPERT_MAX_TOKENS",
    "MAX_EXPERTS",
    "ONESHOT_MAX_TOKENS",
    "PATHS",
    "SortPlan",
    "kernel_entries",
    "moe_sorting_launches",
    "moe_sorting_triton",
    "sort_plan",
]

#: ``T`` up to this: the one-launch path.
ONESHOT_MAX_TOKENS = 16
#: ``T`` up to this (and above ``ONESHOT_MAX_TOKENS``): the per-expert two-launch path; above: tiled.
EXPERT_MAX_TOKENS = 2048
#: Largest expert count: per-expert vectors live in one program's registers.
MAX_EXPERTS = 1024
#: Entries per placement step of the oneshot and tiled paths (a ``CHUNK x CHUNK`` rank comparison;
#: 64 spills SGPRs on gfx950).
CHUNK = 32
#: Entries per scan step, and experts per program, of the per-expert path.
EXPERT_CHUNK = 1024
EXPERTS_PER_PROGRAM = 1
#: Entries per tile of the tiled path.
TILE = 512
#: Expert columns per program, and tile rows per step, of ``sort_tile_prefix``.
PREFIX_EXPERTS = 32
PREFIX_ROWS = 32
#: Output slots per fill step (a ``[units, slots]`` tile), and units per filling program
#: (oneshot and tiled paths; the per-expert path spreads the units over its E programs).
FILL_TILE = 1024
FILL_UNITS = 64

PATHS = ("oneshot", "expert", "tiled")


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class SortPlan:
    """Launch geometry of one shape: a function of ``(T, k, E, unit)`` and the module constants."""

    path: str  # oneshot | expert | tiled
    num_entries: int  # N = T * k
    max_units: int  # length of sorted_expert_ids
    e_pad: int  # per-expert vector length (power of two >= E)
    chunk: int  # C (oneshot, tiled) or CM (expert): entries per step
    experts_per_program: int  # EPP (expert), else 1
    tile: int  # BT (tiled), else 0
    num_tiles: int  # NT (tiled), else 0
    grid: int  # programs of the last launch (the one that fills the units)
    units_per_program: int
    fill_units: int  # BC
    fill_slots: int  # SC
    num_warps: int

    @property
    def launches(self) -> int:
        return {"oneshot": 1, "expert": 2, "tiled": 3}[self.path]


def sort_plan(tokens: int, top_k: int, num_experts: int, unit_size: int) -> SortPlan:
    """The path and launch geometry for ``T = tokens`` (``T >= 1``)."""
    constants = (
        ONESHOT_MAX_TOKENS,
        EXPERT_MAX_TOKENS,
        CHUNK,
        EXPERT_CHUNK,
        EXPERTS_PER_PROGRAM,
        TILE,
        FILL_TILE,
        FILL_UNITS,
    )
    return _plan(tokens, top_k, num_experts, unit_size, constants)


@functools.lru_cache(maxsize=4096)
def _plan(tokens: int, k: int, E: int, unit: int, constants: tuple[int, ...]) -> SortPlan:
    oneshot_max, expert_max, chunk, expert_chunk, epp, tile, fill_tile, fill_units = constants
    n = tokens * k
    max_units = max_num_blocks(n, E, unit)
    slots = min(_pow2(unit), fill_tile)
    common = {
        "num_entries": n,
        "max_units": max_units,
        "e_pad": max(32, _pow2(E)),
        "fill_units": max(1, fill_tile // slots),
        "fill_slots": slots,
    }
    if tokens <= oneshot_max:
        grid = max(1, _cdiv(max_units, fill_units))
        return SortPlan(
            "oneshot",
            chunk=min(chunk, max(16, _pow2(n))),
            experts_per_program=1,
            tile=0,
            num_tiles=0,
            grid=grid,
            units_per_program=_cdiv(max_units, grid),
            num_warps=4,
            **common,
        )
    if tokens <= expert_max:
        epp = min(_pow2(epp), _pow2(E))
        grid = _cdiv(E, epp)
        return SortPlan(
            "expert",
            chunk=min(expert_chunk, max(16, _pow2(n))),
            experts_per_program=epp,
            tile=0,
            num_tiles=0,
            grid=grid,
            units_per_program=_cdiv(max_units, grid),
            num_warps=4,
            **common,
        )
    bt = min(tile, max(16, _pow2(n)))
    nt = _cdiv(n, bt)
    grid = max(nt, _cdiv(max_units, fill_units))
    return SortPlan(
        "tiled",
        chunk=min(chunk, bt),
        experts_per_program=1,
        tile=bt,
        num_tiles=nt,
        grid=grid,
        units_per_program=_cdiv(max_units, grid),
        num_warps=4,
        **common,
    )


#: One kernel launch, described without running it: ``(kernel, grid, args, kwargs)``
#: (``kernel[grid](*args, **kwargs)`` runs it; ``moe amd profile`` compiles it offline).
Launch = tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]]


def _device_guard(device: torch.device) -> Any:
    """Make ``device`` current for the launch (Triton launches on the current device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def moe_sorting_launches(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    unit_size: int = 32,
    expert_mask: torch.Tensor | None = None,
) -> tuple[SortedTokens, list[Launch]]:
    """The outputs (allocated, not yet written) and the launches, in order, for non-empty ``topk_ids``.

    Works on ``meta`` tensors too (what the offline profile builds its launch set from).
    """
    from ._details import _sorting as kernels

    T, k = topk_ids.shape
    E, unit, dev = num_experts, unit_size, topk_ids.device
    plan = sort_plan(T, k, E, unit)
    n, length = plan.num_entries, plan.max_units * unit
    with _device_guard(dev):
        outs = SortedTokens(
            torch.empty(length, dtype=torch.int32, device=dev),
            torch.empty(length, dtype=torch.float32, device=dev),
            torch.empty(plan.max_units, dtype=torch.int32, device=dev),
            torch.empty(2, dtype=torch.int32, device=dev),
        )
        counts = None if plan.path == "oneshot" else torch.empty(E, dtype=torch.int32, device=dev)
        hist = None
        if plan.path == "tiled":
            hist = torch.empty(plan.num_tiles, E, dtype=torch.int32, device=dev)
    mask = topk_ids  # dummy pointer when there is no mask (never read)
    if expert_mask is not None:
        mask = expert_mask.contiguous()
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
    has_mask = expert_mask is not None
    ids, w = topk_ids, topk_weights
    strides = (ids.stride(0), ids.stride(1), w.stride(0), w.stride(1))
    out = tuple(outs)
    e_pad = plan.e_pad
    fill = {
        "B": unit,
        "E_PAD": e_pad,
        "LOG_E": e_pad.bit_length() - 1,
        "BC": plan.fill_units,
        "SC": plan.fill_slots,
        "num_warps": plan.num_warps,
    }
    sizes = (plan.max_units, plan.units_per_program)
    epp = {"EPP": plan.experts_per_program, "CM": plan.chunk}
    launches: list[Launch] = []
    if plan.path == "oneshot":
        launches.append(
            (
                kernels.sort_oneshot,
                (plan.grid,),
                (ids, w, mask, *out, n, E, T, *sizes, *strides),
                {"K": k, "HAS_MASK": has_mask, "C": plan.chunk, **fill},
            )
        )
    elif plan.path == "expert":
        launches.append(
            (
                kernels.sort_expert_count,
                (plan.grid,),
                (ids, mask, counts, n, E, *strides[:2]),
                {"K": k, "HAS_MASK": has_mask, **epp, "E_PAD": e_pad, "num_warps": 4},
            )
        )
        launches.append(
            (
                kernels.sort_expert_scatter,
                (plan.grid,),
                (ids, w, mask, counts, *out, n, E, T, *sizes, *strides),
                {"K": k, "HAS_MASK": has_mask, **epp, **fill},
            )
        )
    else:
        launches.append(
            (
                kernels.sort_tile_count,
                (plan.num_tiles,),
                (ids, mask, hist, n, E, *strides[:2]),
                {"K": k, "HAS_MASK": has_mask, "BT": plan.tile, "E_PAD": e_pad, "num_warps": 4},
            )
        )
        launches.append(
            (
                kernels.sort_tile_prefix,
                (_cdiv(E, PREFIX_EXPERTS),),
                (hist, counts, plan.num_tiles, E),
                {"EB": PREFIX_EXPERTS, "TR": PREFIX_ROWS, "num_warps": 4},
            )
        )
        launches.append(
            (
                kernels.sort_tile_scatter,
                (plan.grid,),
                (ids, w, mask, hist, counts, *out, n, E, T, plan.num_tiles, *sizes, *strides),
                {"K": k, "HAS_MASK": has_mask, "BT": plan.tile, "C": plan.chunk, **fill},
            )
        )
    return outs, launches


def moe_sorting_triton(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    unit_size: int = 32,
    expert_mask: torch.Tensor | None = None,
) -> SortedTokens:
    """:func:`moe_core.sorting.moe_sorting` in Triton (stable; bit-identical to the reference)."""
    kwargs = {"num_experts": num_experts, "unit_size": unit_size, "expert_mask": expert_mask}
    if topk_ids.numel() == 0:
        return moe_sorting_reference(topk_ids, topk_weights, **kwargs)
    outs, launches = moe_sorting_launches(topk_ids, topk_weights, **kwargs)
    with _device_guard(topk_ids.device):
        for kernel, grid, args, kw in launches:
            kernel[grid](*args, **kw)
    return outs


def _supports(request: SortingRequest, device: DeviceInfo) -> str | None:
    return single_program_refusal(
        request, device, MAX_EXPERTS, "per-expert counts and offsets live in one program's registers"
    )


def kernel_entries() -> list[KernelEntry]:
    """``amd.triton.moe_sorting`` (any device, below portable) and its AMD registration (above portable).

    One kernel, two registrations: a priority is one number per entry, and the
    kernel should win on AMD GPUs but leave NVIDIA GPUs and the CPU interpreter
    to the portable sorter. ``MOE_BACKEND=amd.triton.moe_sorting`` forces it on
    any device (the prefix matches both entries; the capability keeps one).
    """
    common = {
        "family": "sorting",
        "op": "moe_sorting",
        "apply": moe_sorting_triton,
        "supports": _supports,
        "features": frozenset({"expert_map"}),
    }
    return [
        KernelEntry(
            name="amd.triton.moe_sorting",
            capability="any",
            priority=PRIORITY_SORTING,
            description="Triton moe_sorting (aiter/CK contract), FlyDSL-style paths by T: 1/2/3 launches, "
            "stable, graph-safe",
            **common,
        ),
        KernelEntry(
            name="amd.triton.moe_sorting.hip",
            capability="hip",
            priority=PRIORITY_SORTING_HIP,
            description="amd.triton.moe_sorting registered for AMD GPUs, above the portable sorter",
            **common,
        ),
    ]
