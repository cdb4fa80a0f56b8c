"""Token sorting for grouped expert GEMMs: three contracts, their references, dispatch.

Every function here takes router ids ``topk_ids [T, k]`` (int32 or int64) and
groups the ``N = T * k`` routed *entries* by expert. Entry ``i = t * k + s`` is
token ``t``'s slot ``s`` (row-major flat index). Common rules:

- Grouping order: experts ascending (the *local* id under expert parallelism,
  see below). The references are stable (entries of one expert in ascending
  flat index); :func:`ragged_metadata` guarantees that order, while
  :func:`align_block_size` and :func:`moe_sorting` kernels may order the
  entries *within* an expert arbitrarily (block contents, padding and every
  other output are still exact).
- Output lengths are static functions of ``(T, k, E, block)``, never of the
  data, so no output shape needs a host synchronisation. With ``B`` the block
  (``block_size`` / ``unit_size``) and ``m = min(E, N)``::

      max_blocks = m + (N - m) // B          # max_num_blocks(N, E, B)
      max_padded = max_blocks * B            # max_padded_len(N, E, B)

  This is the tightest bound valid for every id tensor: with ``c_e`` entries
  on ``m' <= m`` non-empty experts, ``sum ceil(c_e / B) <= m' + (N - m') // B
  <= max_blocks``, reached by ``m - 1`` experts holding one entry and one the
  rest. It is never above vLLM's ``N + E * (B - 1)`` (nor ``N * B``). ``E`` is
  ``num_experts`` (the global count) even with an expert map or mask, since
  the number of local experts is data in a tensor.
- Expert parallelism: ``expert_map`` (int ``[E]``: global id -> local id, or
  ``-1`` for experts of other ranks; local ids in ``[0, E)``, distinct) or
  ``expert_mask`` (``moe_sorting``: ``[E]``, nonzero = local; local id = rank
  among the local experts, ``cumsum(mask != 0) - 1``). Entries routed to a
  non-local expert are *dropped*: never placed, taking no block. Expert ids
  in the outputs are local ids, and blocks are ordered by local id.
- Ids outside ``[0, E)`` are rejected with :class:`MoEInputError` when values
  are checked (CPU tensors, or ``MOE_CHECK_INPUTS=1``; see
  :mod:`moe_core.validation`); unchecked, kernels must drop them (as the
  references do), never fault.
- Outputs are int32 (weights float32) on ``topk_ids``' device; nothing
  synchronises with the host. ``T == 0`` gives length-0 outputs (fixed-length
  ones as stated); kernels are never called with ``T == 0``.

``align_block_size(topk_ids, *, num_experts, block_size, expert_map=None)``
    vLLM's ``moe_align_block_size``. Returns :class:`AlignedBlocks`:

    - ``sorted_token_ids [max_padded]``: for each (local) expert in ascending
      order, its entries' flat indices ``t * k + s`` followed by padding up to
      a multiple of ``block_size``; experts without entries take no block.
      Padding and every position ``>= num_tokens_post_padded`` hold ``N``
      (``= T * k``).
    - ``expert_ids [max_blocks]``: the (local) expert of each block; ``-1`` for
      the blocks at or past ``num_tokens_post_padded / block_size``.
    - ``num_tokens_post_padded [1]``: ``sum_e ceil(c_e / block_size) * block_size``.

``moe_sorting(topk_ids, topk_weights, *, num_experts, unit_size=32, expert_mask=None)``
    aiter/CK ``moe_sorting``. Requires ``T < 2**24`` and ``k < 256``. Same
    grouping and padding with ``B = unit_size``. Returns :class:`SortedTokens`:

    - ``sorted_ids [max_padded]``: entries packed ``(s << 24) | t``, the 32-bit
      pattern stored as int32 (slots ``>= 128`` read negative; unpack with
      ``v & 0xFFFFFF`` and ``(v >> 24) & 0xFF``). Padding and the tail past
      ``num_valid_ids[0]`` hold ``T`` (token ``T``, slot 0).
    - ``sorted_weights [max_padded]`` float32: ``topk_weights[t, s]`` of the
      entry at the same position (converted to float32), ``0.0`` at padding
      and in the tail.
    - ``sorted_expert_ids [max_blocks]``: (local) expert per unit, ``-1`` past
      the used units.
    - ``num_valid_ids [2]``: ``[padded total, T]``.

``ragged_metadata(topk_ids, *, num_experts, expert_map=None)``
    Unpadded grouping for ragged/grouped GEMMs. Order: (local) expert
    ascending, then flat index ascending (stable; exact for kernels too).
    Returns :class:`RaggedMetadata`:

    - ``expert_counts [E]``: kept entries per (local) expert id; ids that no
      expert maps to count 0 (so with a map, ``expert_counts[E_local:]`` is 0).
    - ``expert_offsets [E + 1]``: exclusive prefix sum of the counts;
      ``expert_offsets[-1]`` = number of kept entries.
    - ``gather_indx [N]``: at sorted position ``p < expert_offsets[-1]`` the
      flat index of the entry placed there (token ``= gather_indx // k``);
      ``-1`` from ``expert_offsets[-1]`` on.
    - ``scatter_indx [N]``: at flat index ``i`` the sorted position of entry
      ``i``, ``-1`` if dropped. On kept entries the two are inverse.

Each public function validates its inputs, then runs the best ``sorting``
kernel registered for the op and device (:func:`moe_core.registry.dispatch_op`,
called with the same arguments and a :class:`SortingRequest`), else the
``*_reference`` function. The references are pure, vectorised torch (any
device, no host synchronisation) and are the oracle for plugin tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .device import DeviceInfo, triton_refusal
from .errors import MoEInputError
from .registry import dispatch_op
from .validation import (
    check_dtype,
    check_float_tensor,
    check_same_device,
    check_shape,
    check_tensor,
    check_topk_ids,
    should_check_values,
)

__all__ = [
    "AlignedBlocks",
    "RaggedMetadata",
    "SortedTokens",
    "SortingRequest",
    "align_block_size",
    "align_block_size_reference",
    "max_num_blocks",
    "max_padded_len",
    "moe_sorting",
    "moe_sorting_reference",
    "ragged_metadata",
    "ragged_metadata_reference",
    "single_program_refusal",
]

_INT32_MAX = 2**31 - 1
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


class AlignedBlocks(NamedTuple):
    """Result of :func:`align_block_size` (vLLM contract)."""

    sorted_token_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_tokens_post_padded: torch.Tensor


class SortedTokens(NamedTuple):
    """Result of :func:`moe_sorting` (aiter/CK contract)."""

    sorted_ids: torch.Tensor
    sorted_weights: torch.Tensor
    sorted_expert_ids: torch.Tensor
    num_valid_ids: torch.Tensor


class RaggedMetadata(NamedTuple):
    """Result of :func:`ragged_metadata`."""

    expert_counts: torch.Tensor
    expert_offsets: torch.Tensor
    gather_indx: torch.Tensor
    scatter_indx: torch.Tensor


@dataclass(frozen=True)
class SortingRequest:
    """What a sorting kernel's ``supports(request, device)`` receives.

    ``block_size`` is ``block_size`` / ``unit_size`` (``None`` for
    ``ragged_metadata``); ``expert_parallel`` is set when an ``expert_map`` or
    ``expert_mask`` is given (feature ``expert_map``).
    """

    op: str
    num_experts: int
    top_k: int
    block_size: int | None
    ids_dtype: torch.dtype
    expert_parallel: bool = False

    @property
    def features(self) -> frozenset[str]:
        return frozenset({"expert_map"}) if self.expert_parallel else frozenset()

    def describe(self) -> str:
        block = "" if self.block_size is None else f" block={self.block_size}"
        ep = " expert_map" if self.expert_parallel else ""
        return f"{self.op} E={self.num_experts} top_k={self.top_k}{block} ids={self.ids_dtype}{ep}"


def single_program_refusal(
    request: SortingRequest, device: DeviceInfo, max_experts: int, why: str
) -> str | None:
    """The refusal of a Triton sorter that keeps per-expert state in one program's registers:
    Triton must run on ``device`` (:func:`moe_core.device.triton_refusal`), ``num_experts`` at most
    ``max_experts`` (``why`` says what the limit is), ``topk_ids`` int32 or int64. ``None``: usable."""
    reason = triton_refusal(device)
    if reason:
        return reason
    if request.num_experts > max_experts:
        return f"num_experts={request.num_experts} > {max_experts}: {why}"
    if request.ids_dtype not in (torch.int32, torch.int64):
        return f"topk_ids dtype {request.ids_dtype} not supported (int32, int64)"
    return None


# ----------------------------------------------------------------------------- sizes


def max_num_blocks(num_entries: int, num_experts: int, block_size: int) -> int:
    """Length of ``expert_ids`` / ``sorted_expert_ids``: ``m + (N - m) // B``, ``m = min(E, N)``."""
    m = min(num_experts, num_entries)
    return m + (num_entries - m) // block_size


def max_padded_len(num_entries: int, num_experts: int, block_size: int) -> int:
    """Length of ``sorted_token_ids`` / ``sorted_ids``: ``max_num_blocks(...) * block_size``."""
    return max_num_blocks(num_entries, num_experts, block_size) * block_size


# ----------------------------------------------------------------------------- validation


def _check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MoEInputError(f"{name} must be a positive int, got {value!r}")
    return value


def _check_ids(topk_ids: object, num_experts: int) -> torch.Tensor:
    ids = check_topk_ids(topk_ids, num_experts)
    if ids.shape[1] == 0:
        raise MoEInputError(f"topk_ids must have at least one slot per token, got shape {list(ids.shape)}")
    return ids


def _check_size(topk_ids: torch.Tensor, num_experts: int, block: int) -> None:
    size = max_padded_len(topk_ids.numel(), num_experts, block)
    if size > _INT32_MAX:
        raise MoEInputError(f"padded length {size} does not fit int32 indices")


def _check_expert_map(expert_map: object, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    emap = check_tensor(expert_map, "expert_map")
    check_shape(emap, (num_experts,), "expert_map")
    check_dtype(emap, (torch.int32, torch.int64), "expert_map")
    check_same_device({"topk_ids": topk_ids, "expert_map": emap})
    if should_check_values(emap):
        lo, hi = int(emap.min()), int(emap.max())
        if lo < -1 or hi >= num_experts:
            raise MoEInputError(
                f"expert_map values must be -1 or a local id in [0, {num_experts}), got range [{lo}, {hi}]"
            )
        local = emap[emap >= 0]
        if local.numel() != torch.unique(local).numel():
            raise MoEInputError("expert_map maps two experts to the same local id")
    return emap


def _check_expert_mask(expert_mask: object, topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    mask = check_tensor(expert_mask, "expert_mask")
    check_shape(mask, (num_experts,), "expert_mask")
    check_dtype(mask, _MASK_DTYPES, "expert_mask")
    check_same_device({"topk_ids": topk_ids, "expert_mask": mask})
    return mask


# ----------------------------------------------------------------------------- references


def _mask_to_map(expert_mask: torch.Tensor) -> torch.Tensor:
    """``expert_mask`` -> expert map: local id = rank among the masked experts, else -1."""
    local = expert_mask != 0
    ranks = torch.cumsum(local.to(torch.int64), 0) - 1
    return torch.where(local, ranks, torch.full_like(ranks, -1))


def _group(
    topk_ids: torch.Tensor, num_experts: int, expert_map: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable grouping of the flat entries by (local) expert.

    Returns ``order [N]`` (flat index at each sorted position), ``key [N]``
    (the sorted local expert ids, ``E`` for dropped entries, which sort last)
    and ``counts [E]`` (kept entries per local id), all int64.
    """
    E = num_experts
    ids = topk_ids.reshape(-1).to(torch.int64)
    valid = (ids >= 0) & (ids < E)
    key = torch.where(valid, ids, torch.full_like(ids, E))
    if expert_map is not None:
        local = expert_map.to(torch.int64)[key.clamp(max=E - 1)]
        valid = valid & (local >= 0) & (local < E)
        key = torch.where(valid, local, torch.full_like(ids, E))
    counts = torch.zeros(E + 1, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    key_sorted, order = torch.sort(key, stable=True)
    return order, key_sorted, counts[:E]


def _place(
    key: torch.Tensor, counts: torch.Tensor, block: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded destination of each sorted entry (``length`` for dropped ones) and
    the inclusive cumulative padded sizes per expert ``[E]``."""
    E = counts.numel()
    padded = (counts + block - 1) // block * block
    pad_end = torch.cumsum(padded, 0)
    pad_start = pad_end - padded
    cnt_start = torch.cumsum(counts, 0) - counts
    kept = key < E
    k = key.clamp(max=E - 1)
    pos = torch.arange(key.numel(), dtype=torch.int64, device=key.device)
    dest = torch.where(kept, pad_start[k] + pos - cnt_start[k], torch.full_like(pos, length))
    return dest, pad_end


def _block_experts(pad_end: torch.Tensor, block: int, num_blocks: int) -> torch.Tensor:
    """(Local) expert of each block, ``-1`` past the used blocks."""
    starts = torch.arange(num_blocks, dtype=torch.int64, device=pad_end.device) * block
    expert = torch.searchsorted(pad_end, starts, right=True)
    return torch.where(expert < pad_end.numel(), expert, torch.full_like(expert, -1)).to(torch.int32)


def _scatter_padded(dest: torch.Tensor, values: torch.Tensor, fill: float | int, length: int) -> torch.Tensor:
    """``out[dest[j]] = values[j]`` into ``length`` slots filled with ``fill``
    (``dest == length`` goes to a dropped extra slot: no boolean indexing, no sync)."""
    out = torch.full((length + 1,), fill, dtype=values.dtype, device=values.device)
    out.scatter_(0, dest, values)
    return out[:length]


def align_block_size_reference(
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    block_size: int,
    expert_map: torch.Tensor | None = None,
) -> AlignedBlocks:
    """Pure-torch :func:`align_block_size` (stable within each expert; no validation)."""
    n = topk_ids.numel()
    length = max_padded_len(n, num_experts, block_size)
    order, key, counts = _group(topk_ids, num_experts, expert_map)
    dest, pad_end = _place(key, counts, block_size, length)
    sorted_token_ids = _scatter_padded(dest, order.to(torch.int32), n, length)
    expert_ids = _block_experts(pad_end, block_size, length // block_size)
    return AlignedBlocks(sorted_token_ids, expert_ids, pad_end[-1:].to(torch.int32))


def moe_sorting_reference(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    unit_size: int = 32,
    expert_mask: torch.Tensor | None = None,
) -> SortedTokens:
    """Pure-torch :func:`moe_sorting` (stable within each expert; no validation)."""
    T, k = topk_ids.shape
    n = topk_ids.numel()
    length = max_padded_len(n, num_experts, unit_size)
    expert_map = None if expert_mask is None else _mask_to_map(expert_mask)
    order, key, counts = _group(topk_ids, num_experts, expert_map)
    dest, pad_end = _place(key, counts, unit_size, length)
    packed = ((order % k) << 24) | (order // k)
    packed = torch.where(packed > _INT32_MAX, packed - 2**32, packed).to(torch.int32)
    weights = topk_weights.reshape(-1).to(torch.float32)[order]
    sorted_ids = _scatter_padded(dest, packed, T, length)
    sorted_weights = _scatter_padded(dest, weights, 0.0, length)
    sorted_expert_ids = _block_experts(pad_end, unit_size, length // unit_size)
    num_valid_ids = torch.full((2,), T, dtype=torch.int32, device=topk_ids.device)
    num_valid_ids[:1] = pad_end[-1:]
    return SortedTokens(sorted_ids, sorted_weights, sorted_expert_ids, num_valid_ids)


def ragged_metadata_reference(
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
) -> RaggedMetadata:
    """Pure-torch :func:`ragged_metadata` (no validation)."""
    order, key, counts = _group(topk_ids, num_experts, expert_map)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=order.device)
    offsets[1:] = torch.cumsum(counts, 0)
    pos = torch.arange(order.numel(), dtype=torch.int64, device=order.device)
    kept = key < num_experts
    minus_one = torch.full_like(pos, -1)
    gather_indx = torch.where(kept, order, minus_one)
    scatter_indx = torch.empty_like(pos).scatter_(0, order, torch.where(kept, pos, minus_one))
    return RaggedMetadata(
        counts.to(torch.int32),
        offsets.to(torch.int32),
        gather_indx.to(torch.int32),
        scatter_indx.to(torch.int32),
    )


# ----------------------------------------------------------------------------- public API


def align_block_size(
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    block_size: int,
    expert_map: torch.Tensor | None = None,
) -> AlignedBlocks:
    """Group entries by expert, each group padded to a multiple of ``block_size`` (vLLM).

    Returns ``(sorted_token_ids [max_padded], expert_ids [max_blocks],
    num_tokens_post_padded [1])``, int32; see the module docstring.
    """
    num_experts = _check_positive_int(num_experts, "num_experts")
    block_size = _check_positive_int(block_size, "block_size")
    ids = _check_ids(topk_ids, num_experts)
    if expert_map is not None:
        expert_map = _check_expert_map(expert_map, ids, num_experts)
    _check_size(ids, num_experts, block_size)
    kwargs = {"num_experts": num_experts, "block_size": block_size, "expert_map": expert_map}
    if ids.numel() == 0:
        return align_block_size_reference(ids, **kwargs)
    request = SortingRequest(
        "align_block_size", num_experts, ids.shape[1], block_size, ids.dtype, expert_map is not None
    )
    impl = dispatch_op("sorting", "align_block_size", ids.device, request)
    return (impl or align_block_size_reference)(ids, **kwargs)


def moe_sorting(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    unit_size: int = 32,
    expert_mask: torch.Tensor | None = None,
) -> SortedTokens:
    """Group entries by expert in units of ``unit_size``, ids packed ``(slot << 24) | token`` (aiter/CK).

    Returns ``(sorted_ids, sorted_weights, sorted_expert_ids, num_valid_ids)``;
    see the module docstring.
    """
    num_experts = _check_positive_int(num_experts, "num_experts")
    unit_size = _check_positive_int(unit_size, "unit_size")
    ids = _check_ids(topk_ids, num_experts)
    T, k = ids.shape
    if T >= 2**24:
        raise MoEInputError(f"moe_sorting packs tokens in 24 bits: T={T} must be < 2**24")
    if k >= 256:
        raise MoEInputError(f"moe_sorting packs slots in 8 bits: top_k={k} must be < 256")
    weights = check_float_tensor(topk_weights, "topk_weights")
    check_shape(weights, (T, k), "topk_weights")
    check_same_device({"topk_ids": ids, "topk_weights": weights})
    if expert_mask is not None:
        expert_mask = _check_expert_mask(expert_mask, ids, num_experts)
    _check_size(ids, num_experts, unit_size)
    kwargs = {"num_experts": num_experts, "unit_size": unit_size, "expert_mask": expert_mask}
    if ids.numel() == 0:
        return moe_sorting_reference(ids, weights, **kwargs)
    request = SortingRequest("moe_sorting", num_experts, k, unit_size, ids.dtype, expert_mask is not None)
    impl = dispatch_op("sorting", "moe_sorting", ids.device, request)
    return (impl or moe_sorting_reference)(ids, weights, **kwargs)


def ragged_metadata(
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
) -> RaggedMetadata:
    """Per-expert counts/offsets and gather/scatter permutations (unpadded, stable).

    Returns ``(expert_counts [E], expert_offsets [E + 1], gather_indx [T*k],
    scatter_indx [T*k])``, int32; see the module docstring.
    """
    num_experts = _check_positive_int(num_experts, "num_experts")
    ids = _check_ids(topk_ids, num_experts)
    if expert_map is not None:
        expert_map = _check_expert_map(expert_map, ids, num_experts)
    if ids.numel() > _INT32_MAX:
        raise MoEInputError(f"{ids.numel()} entries do not fit int32 indices")
    kwargs = {"num_experts": num_experts, "expert_map": expert_map}
    if ids.numel() == 0:
        return ragged_metadata_reference(ids, **kwargs)
    request = SortingRequest(
        "ragged_metadata", num_experts, ids.shape[1], None, ids.dtype, expert_map is not None
    )
    impl = dispatch_op("sorting", "ragged_metadata", ids.device, request)
    return (impl or ragged_metadata_reference)(ids, **kwargs)
