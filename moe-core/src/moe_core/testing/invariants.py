"""Checkers of the routing and sorting contracts, written from the contract text.

Each ``check_*`` function takes a kernel's output and the inputs it was given,
recomputes what the contract in :mod:`moe_core.sorting` (or
:mod:`moe_core.routing`) fixes with plain indexing, and raises
``AssertionError`` naming the first broken rule. They accept every output the
contract allows: :func:`check_aligned_blocks` and :func:`check_sorted_tokens`
let a kernel order the entries *within* one expert arbitrarily (pass
``stable=True`` to require the references' order); :func:`check_ragged_metadata`
is exact. Tensors may live on any device (they are copied to the CPU).
"""

from __future__ import annotations

import torch

from ..sorting import AlignedBlocks, RaggedMetadata, SortedTokens, max_num_blocks

__all__ = [
    "check_aligned_blocks",
    "check_ragged_metadata",
    "check_routing",
    "check_sorted_tokens",
    "local_experts",
]


def local_experts(
    topk_ids: torch.Tensor,
    num_experts: int,
    *,
    expert_map: torch.Tensor | None = None,
    expert_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The (local) expert of each flat entry ``t * k + s`` (int64 ``[N]``, CPU), ``-1`` if dropped.

    Dropped: an id outside ``[0, E)``; with ``expert_map``, an expert mapped to
    ``-1`` or to a local id outside ``[0, E)``; with ``expert_mask``, an expert
    whose mask is 0 (local id = rank among the masked-in experts).
    """
    E = num_experts
    flat = topk_ids.detach().reshape(-1).cpu().to(torch.int64)
    valid = (flat >= 0) & (flat < E)
    safe = flat.clamp(0, E - 1)
    if expert_mask is not None:
        keep = expert_mask.detach().cpu() != 0
        table = torch.where(keep, torch.cumsum(keep.long(), 0) - 1, torch.full((E,), -1))
    elif expert_map is not None:
        table = expert_map.detach().cpu().to(torch.int64)
    else:
        table = torch.arange(E)
    local = table[safe]
    valid &= (local >= 0) & (local < E)
    return torch.where(valid, local, torch.full_like(local, -1))


def _check(ok: bool | torch.Tensor, message: str) -> None:
    if not bool(ok):
        raise AssertionError(message)


def _check_tensor(t: torch.Tensor, name: str, dtype: torch.dtype, shape: tuple, device: torch.device) -> None:
    _check(isinstance(t, torch.Tensor), f"{name} must be a tensor, got {type(t).__name__}")
    _check(t.dtype == dtype, f"{name} has dtype {t.dtype}, the contract says {dtype}")
    _check(tuple(t.shape) == shape, f"{name} has shape {tuple(t.shape)}, the contract says {shape}")
    _check(t.device == device, f"{name} is on {t.device}, expected {device} (the ids' device)")


def _check_blocked(
    entries: torch.Tensor,
    block_expert: torch.Tensor,
    total: int,
    local: torch.Tensor,
    num_experts: int,
    block: int,
    pad: int,
    stable: bool,
    names: tuple[str, str, str],
) -> None:
    """A padded, blocked grouping of the flat entries: ``entries`` holds a flat index or ``pad``."""
    ids_name, experts_name, total_name = names
    E, B, N = num_experts, block, local.numel()
    entries = entries.long()
    block_expert = block_expert.long()
    kept = local >= 0
    counts = torch.bincount(local[kept], minlength=E)
    padded = (counts + B - 1) // B * B
    want_total = int(padded.sum())
    _check(total == want_total, f"{total_name} is {total}, expected {want_total} (sum of padded counts)")
    _check(
        bool((entries[total:] == pad).all()),
        f"{ids_name}: every position >= {total_name} must hold the padding value {pad}",
    )
    used = total // B
    _check(bool((block_expert[used:] == -1).all()), f"{experts_name}: blocks past the used ones must be -1")
    be = block_expert[:used]
    _check(bool(((be >= 0) & (be < E)).all()), f"{experts_name}: a used block holds an expert outside [0, E)")
    _check(bool((be[1:] >= be[:-1]).all()), f"{experts_name}: blocks must be ordered by (local) expert")
    _check(
        torch.equal(torch.bincount(be, minlength=E) * B, padded),
        f"{experts_name}: each expert must take ceil(count / {B}) blocks",
    )
    head = entries[:total]
    is_pad = head == pad
    real = head[~is_pad]
    _check(bool(((real >= 0) & (real < N)).all()), f"{ids_name}: an entry index outside [0, T*k)")
    placed = torch.bincount(real, minlength=N)
    _check(
        torch.equal(placed, kept.long()),
        f"{ids_name}: every kept entry must appear exactly once and dropped ones never "
        f"(missing {(placed < kept.long()).nonzero().flatten()[:8].tolist()}, "
        f"extra {(placed > kept.long()).nonzero().flatten()[:8].tolist()})",
    )
    pos_expert = be.repeat_interleave(B)
    _check(
        torch.equal(local[real], pos_expert[~is_pad]),
        f"{ids_name}: an entry sits in a block of another expert",
    )
    start = torch.cumsum(padded, 0) - padded
    within = torch.arange(total) - start[pos_expert]
    _check(
        torch.equal(is_pad, within >= counts[pos_expert]),
        f"{ids_name}: padding must come only after each expert's entries",
    )
    if stable:
        same = pos_expert[~is_pad][1:] == pos_expert[~is_pad][:-1]
        _check(
            bool((real[1:][same] > real[:-1][same]).all()), f"{ids_name}: entries of an expert out of order"
        )


def check_aligned_blocks(
    out: AlignedBlocks,
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    block_size: int,
    expert_map: torch.Tensor | None = None,
    stable: bool = False,
) -> None:
    """``out`` is a valid :func:`moe_core.sorting.align_block_size` result for these inputs."""
    _check(isinstance(out, tuple) and len(out) == 3, "align_block_size must return a 3-field named tuple")
    sorted_token_ids, expert_ids, post_padded = out
    N, device = topk_ids.numel(), topk_ids.device
    nb = max_num_blocks(N, num_experts, block_size)
    _check_tensor(sorted_token_ids, "sorted_token_ids", torch.int32, (nb * block_size,), device)
    _check_tensor(expert_ids, "expert_ids", torch.int32, (nb,), device)
    _check_tensor(post_padded, "num_tokens_post_padded", torch.int32, (1,), device)
    local = local_experts(topk_ids, num_experts, expert_map=expert_map)
    _check_blocked(
        sorted_token_ids.cpu(),
        expert_ids.cpu(),
        int(post_padded[0]),
        local,
        num_experts,
        block_size,
        N,
        stable,
        ("sorted_token_ids", "expert_ids", "num_tokens_post_padded"),
    )


def check_sorted_tokens(
    out: SortedTokens,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    num_experts: int,
    unit_size: int,
    expert_mask: torch.Tensor | None = None,
    stable: bool = False,
) -> None:
    """``out`` is a valid :func:`moe_core.sorting.moe_sorting` result for these inputs."""
    _check(isinstance(out, tuple) and len(out) == 4, "moe_sorting must return a 4-field named tuple")
    sorted_ids, sorted_weights, sorted_expert_ids, num_valid_ids = out
    T, k = topk_ids.shape
    N, device = topk_ids.numel(), topk_ids.device
    nb = max_num_blocks(N, num_experts, unit_size)
    _check_tensor(sorted_ids, "sorted_ids", torch.int32, (nb * unit_size,), device)
    _check_tensor(sorted_weights, "sorted_weights", torch.float32, (nb * unit_size,), device)
    _check_tensor(sorted_expert_ids, "sorted_expert_ids", torch.int32, (nb,), device)
    _check_tensor(num_valid_ids, "num_valid_ids", torch.int32, (2,), device)
    total, tokens = num_valid_ids.cpu().tolist()
    _check(tokens == T, f"num_valid_ids[1] is {tokens}, expected T={T}")
    packed = sorted_ids.cpu().long() & 0xFFFFFFFF
    is_pad = packed == T  # token T, slot 0
    token, slot = packed & 0xFFFFFF, (packed >> 24) & 0xFF
    _check(bool((token[~is_pad] < T).all()), "sorted_ids: a packed token >= T that is not the padding value")
    _check(bool((slot[~is_pad] < k).all()), "sorted_ids: a packed slot >= top_k")
    flat = torch.where(is_pad, torch.full_like(token, N), token * k + slot)
    local = local_experts(topk_ids, num_experts, expert_mask=expert_mask)
    _check_blocked(
        flat,
        sorted_expert_ids.cpu(),
        total,
        local,
        num_experts,
        unit_size,
        N,
        stable,
        ("sorted_ids", "sorted_expert_ids", "num_valid_ids[0]"),
    )
    weights = topk_weights.detach().cpu().float().reshape(-1)
    got = sorted_weights.cpu()
    _check(
        torch.equal(got[~is_pad], weights[flat[~is_pad]]),
        "sorted_weights: each entry's weight must be topk_weights[t, s] as float32",
    )
    _check(bool((got[is_pad] == 0).all()), "sorted_weights: padding and tail must be 0.0")


def check_ragged_metadata(
    out: RaggedMetadata,
    topk_ids: torch.Tensor,
    *,
    num_experts: int,
    expert_map: torch.Tensor | None = None,
) -> None:
    """``out`` is exactly the :func:`moe_core.sorting.ragged_metadata` result for these inputs."""
    _check(isinstance(out, tuple) and len(out) == 4, "ragged_metadata must return a 4-field named tuple")
    counts_out, offsets_out, gather_out, scatter_out = out
    E, N, device = num_experts, topk_ids.numel(), topk_ids.device
    _check_tensor(counts_out, "expert_counts", torch.int32, (E,), device)
    _check_tensor(offsets_out, "expert_offsets", torch.int32, (E + 1,), device)
    _check_tensor(gather_out, "gather_indx", torch.int32, (N,), device)
    _check_tensor(scatter_out, "scatter_indx", torch.int32, (N,), device)
    local = local_experts(topk_ids, E, expert_map=expert_map)
    kept = local >= 0
    counts = torch.bincount(local[kept], minlength=E)
    _check(torch.equal(counts_out.cpu().long(), counts), "expert_counts: wrong count of kept entries")
    offsets = torch.zeros(E + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    _check(torch.equal(offsets_out.cpu().long(), offsets), "expert_offsets: not the prefix sum of the counts")
    K = int(kept.sum())
    key = torch.where(kept, local, E) * (N + 1) + torch.arange(N)
    expected = torch.argsort(key)[:K]
    gather = gather_out.cpu().long()
    _check(torch.equal(gather[:K], expected), "gather_indx: not (local expert, flat index) ascending")
    _check(bool((gather[K:] == -1).all()), "gather_indx: positions past the kept entries must be -1")
    scatter = scatter_out.cpu().long()
    _check(torch.equal(scatter[expected], torch.arange(K)), "scatter_indx: not the inverse of gather_indx")
    _check(bool((scatter[~kept] == -1).all()), "scatter_indx: dropped entries must be -1")


def check_routing(
    got: tuple[torch.Tensor, torch.Tensor],
    expected: tuple[torch.Tensor, torch.Tensor],
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """A routing kernel's ``(weights, ids)`` against :func:`moe_core.routing.select_experts_reference`.

    Ids must be equal (ties go to the lowest index, in descending score
    order); weights float32, within ``rtol``/``atol``; both contiguous, on the
    reference's device and of its shape.
    """
    _check(isinstance(got, tuple) and len(got) == 2, "select_experts must return (weights, ids)")
    weights, ids = got
    want_w, want_ids = expected
    _check_tensor(weights, "weights", torch.float32, tuple(want_w.shape), want_w.device)
    _check_tensor(ids, "ids", torch.int32, tuple(want_ids.shape), want_ids.device)
    _check(weights.is_contiguous() and ids.is_contiguous(), "weights and ids must be contiguous")
    diff = (ids != want_ids).any(dim=-1).nonzero().flatten()
    if diff.numel():
        t = int(diff[0])
        raise AssertionError(
            f"ids differ on {diff.numel()} token(s); token {t}: got {ids[t].tolist()}, "
            f"expected {want_ids[t].tolist()}"
        )
    if not torch.allclose(weights, want_w, rtol=rtol, atol=atol):
        err = (weights - want_w).abs().max().item()
        raise AssertionError(
            f"weights differ from the reference by up to {err:.3g} (rtol={rtol}, atol={atol})"
        )
