"""Portable (Triton) sorting kernels (family ``sorting``): the three contracts of :mod:`moe_core.sorting`.

``portable.triton.align_block_size``, ``portable.triton.moe_sorting`` and
``portable.triton.ragged_metadata`` share two kernels
(``_details/_sorting.py``). Results are bit-identical to the references
(entries of one expert in ascending flat index), outputs have the
references' static lengths, nothing synchronises with the host and the
launch count depends on the shapes only, so every call captures in a CUDA
graph:

- ``N = T * k <= FUSED_MAX_ENTRIES``: **one launch** (``sort_place`` rebuilds
  the per-expert counts from the ids in every program);
- larger ``N``: **two launches** (``sort_count`` per tile, then ``sort_place``).

Outputs are allocated with ``torch.empty`` and every slot is written by a
kernel (entries, padding, ``-1`` tails). Expert maps / masks are handled in
the kernels (``expert_map`` feature). Up to :data:`MAX_EXPERTS` experts; any
block size. Importing this module imports no Triton.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any

import torch

from moe_core import DeviceInfo, KernelEntry
from moe_core.sorting import (
    AlignedBlocks,
    RaggedMetadata,
    SortedTokens,
    SortingRequest,
    align_block_size_reference,
    max_num_blocks,
    max_padded_len,
    moe_sorting_reference,
    ragged_metadata_reference,
    single_program_refusal,
)

from ._common import PRIORITY
from ._launch import run_launch

__all__ = [
    "FUSED_MAX_ENTRIES",
    "MAX_EXPERTS",
    "align_block_size_triton",
    "kernel_entries",
    "launch_plan",
    "moe_sorting_triton",
    "ragged_metadata_triton",
    "sorting_launches",
]

#: Largest expert count: per-expert scans and lookups live in one program's registers.
MAX_EXPERTS = 1024
#: ``T * k`` up to this runs in one launch; above, a counting launch comes first.
FUSED_MAX_ENTRIES = 4096
#: Tile of entries per program when fused (smaller ``N``: the next power of two).
FUSED_TILE = 1024
#: Tile of entries per program on the two-launch path (grown past ``TARGET_TILES`` tiles).
TILE = 1024
TARGET_TILES = 64
MAX_TILE = 4096
#: Output positions per fill step (``[blocks, slots]`` tile) and per program (grid sizing).
FILL_TILE = 2048
FILL_PER_PROGRAM = 4096
#: ``hist`` elements loaded per step on the two-launch path.
HIST_TILE = 4096


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class LaunchPlan:
    """Launch geometry for one shape (a function of ``op, N, E, block`` only)."""

    fused: bool  # one launch (True) or two
    tile: int  # BT: entries per tile (power of two)
    num_tiles: int  # NT
    grid: int  # programs of sort_place (>= num_tiles)
    max_blocks: int  # blocks (ragged: positions) to fill
    blocks_per_program: int
    e_pad: int  # per-expert vector length (power of two)
    hist_rows: int  # TC: hist rows per load step
    fill_blocks: int  # BC: blocks per fill step
    fill_slots: int  # SC: slots per fill step
    num_warps: int

    @property
    def launches(self) -> int:
        return 1 if self.fused else 2


@functools.lru_cache(maxsize=1024)
def launch_plan(op: str, num_entries: int, num_experts: int, block: int) -> LaunchPlan:
    """The launch geometry of ``op`` for ``N = num_entries`` (``block`` 1 for ragged_metadata)."""
    n = num_entries
    fused = n <= FUSED_MAX_ENTRIES
    if fused:
        tile = min(FUSED_TILE, max(16, _pow2(n)))
    else:
        tile = min(MAX_TILE, max(TILE, _pow2(_cdiv(n, TARGET_TILES))))
    num_tiles = _cdiv(n, tile)
    max_blocks = max_num_blocks(n, num_experts, block)
    grid = max(num_tiles, _cdiv(max_blocks * block, FILL_PER_PROGRAM))
    e_pad = max(32, _pow2(num_experts))
    slots = 1 if op == "ragged_metadata" else min(_pow2(block), FILL_TILE)
    if tile >= 4096:
        num_warps = 8
    elif tile >= 512 or e_pad >= 512:
        num_warps = 4
    else:
        num_warps = 2
    return LaunchPlan(
        fused=fused,
        tile=tile,
        num_tiles=num_tiles,
        grid=grid,
        max_blocks=max_blocks,
        blocks_per_program=_cdiv(max_blocks, grid),
        e_pad=e_pad,
        hist_rows=max(2, min(_pow2(num_tiles), HIST_TILE // e_pad)),
        fill_blocks=max(1, FILL_TILE // slots),
        fill_slots=slots,
        num_warps=num_warps,
    )


def _device_guard(device: torch.device) -> Any:
    """Make ``device`` current for the launch (Triton launches on the current device)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


Launch = tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]]


def _launches(
    op: str,
    topk_ids: torch.Tensor,
    num_experts: int,
    block: int,
    emap: torch.Tensor | None,
    map_mode: int,
    weights: torch.Tensor | None,
    outs: dict[str, torch.Tensor],
) -> list[Launch]:
    """The launches of one sorting op, in order, as ``(kernel, grid, args, kwargs)`` (none run)."""
    from ._details import _sorting as kernels

    T, k = topk_ids.shape
    n = T * k
    plan = launch_plan(op, n, num_experts, block)
    dummy = topk_ids
    emap = dummy if emap is None else emap
    w = dummy if weights is None else weights
    hist = dummy
    common = {"K": k, "MAP": map_mode, "BT": plan.tile, "E_PAD": plan.e_pad}
    launches: list[Launch] = []
    if not plan.fused:
        with _device_guard(topk_ids.device):
            hist = torch.empty(plan.num_tiles, num_experts, dtype=torch.int32, device=topk_ids.device)
        launches.append(
            (
                kernels.sort_count,
                (plan.num_tiles,),
                (topk_ids, emap, hist, n, num_experts, topk_ids.stride(0), topk_ids.stride(1)),
                {**common, "num_warps": plan.num_warps},
            )
        )
    launches.append(
        (
            kernels.sort_place,
            (plan.grid,),
            (
                topk_ids,
                emap,
                hist,
                w,
                outs.get("ids", dummy),
                outs.get("vals", dummy),
                outs.get("blk", dummy),
                outs.get("num", dummy),
                outs.get("offsets", dummy),
                n,
                num_experts,
                T,
                plan.num_tiles,
                plan.max_blocks,
                plan.blocks_per_program,
                topk_ids.stride(0),
                topk_ids.stride(1),
                w.stride(0),
                w.stride(1),
            ),
            dict(
                OP=kernels.OPS[op],
                FROM_IDS=plan.fused,
                BLOCK=block,
                LOG_BT=plan.tile.bit_length() - 1,
                LOG_E=plan.e_pad.bit_length() - 1,
                TC=plan.hist_rows,
                BC=plan.fill_blocks,
                SC=plan.fill_slots,
                **common,
                num_warps=plan.num_warps,
            ),
        )
    )
    return launches


def sorting_launches(
    op: str,
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    block: int = 1,
    expert_map: torch.Tensor | None = None,
    topk_weights: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], list[Launch]]:
    """The outputs (allocated) and launches (in order, none run) of ``op`` for non-empty ``topk_ids``.

    What :func:`align_block_size_triton` (``block``: the block size), :func:`moe_sorting_triton`
    (``block``: the unit size, ``expert_map``: the expert mask, ``topk_weights``) and
    :func:`ragged_metadata_triton` (``block`` 1) run; ``outs`` keys as in :func:`_launches`.
    """
    n, dev = topk_ids.numel(), topk_ids.device
    if op == "ragged_metadata":
        block = 1
        outs = {
            "num": torch.empty(num_experts, dtype=torch.int32, device=dev),
            "offsets": torch.empty(num_experts + 1, dtype=torch.int32, device=dev),
            "ids": torch.empty(n, dtype=torch.int32, device=dev),
            "vals": torch.empty(n, dtype=torch.int32, device=dev),
        }
    else:
        length = max_padded_len(n, num_experts, block)
        outs = {"ids": torch.empty(length, dtype=torch.int32, device=dev)}
        if op == "moe_sorting":
            outs["vals"] = torch.empty(length, dtype=torch.float32, device=dev)
        outs["blk"] = torch.empty(length // block, dtype=torch.int32, device=dev)
        outs["num"] = torch.empty(2 if op == "moe_sorting" else 1, dtype=torch.int32, device=dev)
    if op == "moe_sorting":
        mask = None
        if expert_map is not None:
            mask = expert_map.contiguous()
            if mask.dtype == torch.bool:
                mask = mask.view(torch.uint8)
        launches = _launches(
            op, topk_ids, num_experts, block, mask, 2 * (mask is not None), topk_weights, outs
        )
    else:
        emap = None if expert_map is None else expert_map.contiguous()
        launches = _launches(op, topk_ids, num_experts, block, emap, int(emap is not None), None, outs)
    return outs, launches


def _run(device: torch.device, launches: list[Launch]) -> None:
    with _device_guard(device):
        for kernel, grid, args, kwargs in launches:
            run_launch(kernel, grid, args, kwargs)


def align_block_size_triton(
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    block_size: int,
    expert_map: torch.Tensor | None = None,
) -> AlignedBlocks:
    """:func:`moe_core.sorting.align_block_size` in Triton (stable; bit-identical to the reference)."""
    kwargs = {"num_experts": num_experts, "block_size": block_size, "expert_map": expert_map}
    if topk_ids.numel() == 0:
        return align_block_size_reference(topk_ids, **kwargs)
    outs, launches = sorting_launches(
        "align_block_size", topk_ids, num_experts=num_experts, block=block_size, expert_map=expert_map
    )
    _run(topk_ids.device, launches)
    return AlignedBlocks(outs["ids"], outs["blk"], outs["num"])


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
    outs, launches = sorting_launches(
        "moe_sorting",
        topk_ids,
        num_experts=num_experts,
        block=unit_size,
        expert_map=expert_mask,
        topk_weights=topk_weights,
    )
    _run(topk_ids.device, launches)
    return SortedTokens(outs["ids"], outs["vals"], outs["blk"], outs["num"])


def ragged_metadata_triton(
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
) -> RaggedMetadata:
    """:func:`moe_core.sorting.ragged_metadata` in Triton (stable, as the contract requires)."""
    if topk_ids.numel() == 0:
        return ragged_metadata_reference(topk_ids, num_experts=num_experts, expert_map=expert_map)
    outs, launches = sorting_launches(
        "ragged_metadata", topk_ids, num_experts=num_experts, expert_map=expert_map
    )
    _run(topk_ids.device, launches)
    return RaggedMetadata(outs["num"], outs["offsets"], outs["ids"], outs["vals"])


def _supports(request: SortingRequest, device: DeviceInfo) -> str | None:
    return single_program_refusal(
        request, device, MAX_EXPERTS, "the per-expert scans run in one program's registers"
    )


def kernel_entries() -> list[KernelEntry]:
    """The sorting kernels of this plugin (one per op)."""
    common = {
        "family": "sorting",
        "supports": _supports,
        "features": frozenset({"expert_map"}),
        "capability": "any",
        "priority": PRIORITY,
    }
    return [
        KernelEntry(
            name="portable.triton.align_block_size",
            op="align_block_size",
            apply=align_block_size_triton,
            description="Triton align_block_size (vLLM contract): stable, 1-2 launches, graph-safe",
            **common,
        ),
        KernelEntry(
            name="portable.triton.moe_sorting",
            op="moe_sorting",
            apply=moe_sorting_triton,
            description="Triton moe_sorting (aiter/CK contract): stable, 1-2 launches, graph-safe",
            **common,
        ),
        KernelEntry(
            name="portable.triton.ragged_metadata",
            op="ragged_metadata",
            apply=ragged_metadata_triton,
            description="Triton ragged_metadata: counts, offsets, gather/scatter indices; 1-2 launches",
            **common,
        ),
    ]
