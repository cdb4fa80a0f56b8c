"""moe_core.sorting: invariants (hypothesis), a brute-force oracle, errors, dispatch.

The invariant checkers and the oracle are written from the contract text in
the module docstring, not from the implementation: they recompute each entry's
(local) expert with plain indexing and check the outputs position by position.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_core
from moe_core import KernelEntry, MoEInputError
from moe_core.registry import get_registry
from moe_core.sorting import (
    AlignedBlocks,
    RaggedMetadata,
    SortedTokens,
    align_block_size,
    align_block_size_reference,
    max_num_blocks,
    max_padded_len,
    moe_sorting,
    moe_sorting_reference,
    ragged_metadata,
    ragged_metadata_reference,
)

BLOCKS = [1, 3, 16, 17, 32, 64, 128]
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ----------------------------------------------------------------------------- cases


@dataclass
class Case:
    ids: torch.Tensor  # [T, k]
    weights: torch.Tensor  # [T, k]
    E: int
    block: int
    local_of_global: list[int] | None  # global id -> local id or -1 (None: no EP)

    @property
    def T(self) -> int:
        return self.ids.shape[0]

    @property
    def k(self) -> int:
        return self.ids.shape[1]

    @property
    def N(self) -> int:
        return self.ids.numel()

    def expert_map(self) -> torch.Tensor | None:
        if self.local_of_global is None:
            return None
        return torch.tensor(self.local_of_global, dtype=torch.int32)

    def expert_mask(self, dtype: torch.dtype = torch.bool) -> torch.Tensor | None:
        if self.local_of_global is None:
            return None
        return torch.tensor([v >= 0 for v in self.local_of_global]).to(dtype)

    def local(self, numbering: str = "map") -> torch.Tensor:
        """Local expert of each flat entry (int64 [N]), -1 if dropped.

        ``numbering="map"``: the map's local ids; ``"mask"``: rank among the local experts.
        """
        flat = self.ids.reshape(-1).long()
        if self.local_of_global is None:
            return flat
        table = torch.tensor(self.local_of_global, dtype=torch.int64)
        if numbering == "mask":
            keep = table >= 0
            ranks = torch.zeros_like(table)
            ranks[keep] = torch.arange(int(keep.sum()))
            table = torch.where(keep, ranks, -1)
        return table[flat]


@st.composite
def cases(draw, max_t: int = 5000, max_e: int = 513, max_k: int = 9, blocks=BLOCKS) -> Case:
    E = draw(st.integers(1, max_e))
    k = draw(st.integers(1, min(max_k, E)))
    T = draw(st.one_of(st.integers(0, 40), st.integers(0, max_t), st.integers(max_t // 2, max_t)))
    block = draw(st.sampled_from(blocks))
    distinct = draw(st.booleans())  # real routers: distinct ids per token; the contract holds for repeats
    hot = draw(st.sampled_from([0, 1, 3]))  # concentrate the load on a few experts
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if distinct:
        scores = torch.rand(T, E, generator=g)
        if hot:
            scores[:, : hot + k] += 1.0
        ids = scores.topk(k, dim=1).indices
    else:
        ids = torch.randint(0, min(E, hot) if hot else E, (T, k), generator=g)
    ids = ids.to(draw(st.sampled_from([torch.int32, torch.int64])))
    if draw(st.booleans()):  # non-contiguous, same values
        ids = ids.t().contiguous().t()
    weights = torch.rand(T, k, generator=g).to(draw(st.sampled_from([torch.float32, torch.bfloat16])))
    local_of_global = None
    if draw(st.booleans()):
        p = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
        keep = torch.rand(E, generator=g) < p
        if draw(st.booleans()):
            local_ids = torch.randperm(int(keep.sum()), generator=g)  # arbitrary injective numbering
        else:
            local_ids = torch.arange(int(keep.sum()))  # contiguous / monotone (vLLM, aiter)
        table = torch.full((E,), -1, dtype=torch.int64)
        table[keep] = local_ids
        local_of_global = table.tolist()
    return Case(ids, weights, E, block, local_of_global)


def _bound_blocks(N: int, E: int, B: int) -> int:
    """The documented bound, written out again: m + (N - m) // B with m = min(E, N)."""
    m = min(E, N)
    return m + (N - m) // B


# ----------------------------------------------------------------------------- invariant checkers


def check_blocked(
    entries: torch.Tensor,
    block_expert: torch.Tensor,
    total: int,
    local: torch.Tensor,
    E: int,
    B: int,
    pad: int,
    stable: bool,
) -> None:
    """Check a padded, blocked grouping of the flat entries (pad value ``pad``).

    ``entries``: flat index per position (``pad`` at padding); ``local``: local
    expert per flat entry, -1 if dropped.
    """
    N = local.numel()
    entries = entries.long()
    block_expert = block_expert.long()
    nb = _bound_blocks(N, E, B)
    assert entries.shape == (nb * B,)
    assert block_expert.shape == (nb,)
    kept = local >= 0
    counts = torch.bincount(local[kept], minlength=E)
    assert counts.numel() == E  # local ids < E
    padded = (counts + B - 1) // B * B
    assert total == int(padded.sum())
    assert total % B == 0
    # tails exact
    assert bool((entries[total:] == pad).all())
    used = total // B
    assert bool((block_expert[used:] == -1).all())
    # blocks: valid expert, ascending, as many per expert as its padded count needs
    be = block_expert[:used]
    assert bool(((be >= 0) & (be < E)).all())
    assert bool((be[1:] >= be[:-1]).all())
    assert torch.equal(torch.bincount(be, minlength=E) * B, padded)
    # every kept entry exactly once, dropped never
    head = entries[:total]
    is_pad = head == pad
    real = head[~is_pad]
    assert bool(((real >= 0) & (real < N)).all())
    assert torch.equal(torch.bincount(real, minlength=N), kept.long())
    # each position's entry belongs to its block's expert; padding only at the end of the expert's run
    pos_expert = be.repeat_interleave(B)
    assert torch.equal(local[real], pos_expert[~is_pad])
    start = torch.cumsum(padded, 0) - padded
    within = torch.arange(total) - start[pos_expert]
    assert torch.equal(is_pad, within >= counts[pos_expert])
    if stable:
        same = pos_expert[~is_pad][1:] == pos_expert[~is_pad][:-1]
        assert bool((real[1:][same] > real[:-1][same]).all())


def check_align(out: AlignedBlocks, case: Case, stable: bool = True) -> None:
    assert isinstance(out, AlignedBlocks)
    for t in out:
        assert t.dtype == torch.int32
    assert out.num_tokens_post_padded.shape == (1,)
    total = int(out.num_tokens_post_padded[0])
    check_blocked(
        out.sorted_token_ids, out.expert_ids, total, case.local(), case.E, case.block, case.N, stable
    )


def _unpack(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = v.long()
    return v & 0xFFFFFF, (v >> 24) & 0xFF


def check_sorting(out: SortedTokens, case: Case, stable: bool = True) -> None:
    assert isinstance(out, SortedTokens)
    assert out.sorted_ids.dtype == torch.int32
    assert out.sorted_weights.dtype == torch.float32
    assert out.sorted_expert_ids.dtype == torch.int32
    assert out.num_valid_ids.dtype == torch.int32
    assert out.num_valid_ids.shape == (2,)
    total, T = out.num_valid_ids.tolist()
    assert T == case.T
    assert out.sorted_weights.shape == out.sorted_ids.shape
    is_pad = out.sorted_ids == case.T  # token T, slot 0
    token, slot = _unpack(out.sorted_ids)
    assert bool((token[~is_pad] < case.T).all())
    assert bool((slot[~is_pad] < case.k).all())
    flat = torch.where(is_pad, case.N, token * case.k + slot)
    check_blocked(flat, out.sorted_expert_ids, total, case.local("mask"), case.E, case.block, case.N, stable)
    # weights at the packed (token, slot), 0 at padding and in the tail
    w = case.weights.float().reshape(-1)
    assert torch.equal(out.sorted_weights[~is_pad], w[flat[~is_pad]])
    assert bool((out.sorted_weights[is_pad] == 0).all())


def check_ragged(out: RaggedMetadata, case: Case) -> None:
    assert isinstance(out, RaggedMetadata)
    for t in out:
        assert t.dtype == torch.int32
    E, N = case.E, case.N
    assert out.expert_counts.shape == (E,)
    assert out.expert_offsets.shape == (E + 1,)
    assert out.gather_indx.shape == (N,)
    assert out.scatter_indx.shape == (N,)
    local = case.local()
    kept = local >= 0
    counts = torch.bincount(local[kept], minlength=E)
    assert torch.equal(out.expert_counts.long(), counts)
    assert out.expert_offsets[0] == 0
    assert torch.equal(out.expert_offsets[1:].long(), torch.cumsum(counts, 0))
    K = int(kept.sum())
    assert int(out.expert_offsets[-1]) == K
    # exact order: (local expert, flat index) ascending, dropped excluded
    key = torch.where(kept, local, E) * (N + 1) + torch.arange(N)
    expected = torch.argsort(key)[:K]
    gather = out.gather_indx.long()
    assert torch.equal(gather[:K], expected)
    assert bool((gather[K:] == -1).all())
    scatter = out.scatter_indx.long()
    assert torch.equal(scatter[gather[:K]], torch.arange(K))
    assert bool((scatter[~kept] == -1).all())


# ----------------------------------------------------------------------------- hypothesis invariants


@SETTINGS
@given(case=cases())
def test_align_block_size_invariants(case: Case) -> None:
    out = align_block_size(case.ids, num_experts=case.E, block_size=case.block, expert_map=case.expert_map())
    check_align(out, case)


@SETTINGS
@given(case=cases(), mask_dtype=st.sampled_from([torch.bool, torch.int32, torch.uint8]))
def test_moe_sorting_invariants(case: Case, mask_dtype: torch.dtype) -> None:
    out = moe_sorting(
        case.ids,
        case.weights,
        num_experts=case.E,
        unit_size=case.block,
        expert_mask=case.expert_mask(mask_dtype),
    )
    check_sorting(out, case)


@SETTINGS
@given(case=cases())
def test_ragged_metadata_invariants(case: Case) -> None:
    out = ragged_metadata(case.ids, num_experts=case.E, expert_map=case.expert_map())
    check_ragged(out, case)


# ----------------------------------------------------------------------------- brute-force oracle


def oracle_groups(case: Case, numbering: str) -> list[list[int]]:
    """Per local expert, its flat indices in ascending order (plain Python)."""
    E, k = case.E, case.k
    groups: list[list[int]] = [[] for _ in range(E)]
    mask_rank = {}
    if case.local_of_global is not None:
        for g, v in enumerate(case.local_of_global):
            if v >= 0:
                mask_rank[g] = len(mask_rank)
    for t, row in enumerate(case.ids.tolist()):
        for s, e in enumerate(row):
            if case.local_of_global is None:
                loc = e
            elif numbering == "map":
                loc = case.local_of_global[e]
            else:
                loc = mask_rank.get(e, -1)
            if loc >= 0:
                groups[loc].append(t * k + s)
    return groups


def oracle_blocked(groups: list[list[int]], B: int, length: int, pad: int) -> tuple[list, list, int]:
    entries, experts = [], []
    for e, members in enumerate(groups):
        if not members:
            continue
        n_blocks = -(-len(members) // B)
        entries += members + [pad] * (n_blocks * B - len(members))
        experts += [e] * n_blocks
    total = len(entries)
    entries += [pad] * (length - total)
    experts += [-1] * (length // B - len(experts))
    return entries, experts, total


def oracle_align(case: Case) -> tuple[list, list, list]:
    length = _bound_blocks(case.N, case.E, case.block) * case.block
    entries, experts, total = oracle_blocked(oracle_groups(case, "map"), case.block, length, case.N)
    return entries, experts, [total]


def oracle_sorting(case: Case) -> tuple[list, list, list, list]:
    T, k = case.T, case.k
    length = _bound_blocks(case.N, case.E, case.block) * case.block
    entries, experts, total = oracle_blocked(oracle_groups(case, "mask"), case.block, length, -1)
    w = case.weights.float().reshape(-1).tolist()
    packed = [T if i < 0 else ((i % k) << 24) | (i // k) for i in entries]
    ids = [v - 2**32 if v >= 2**31 else v for v in packed]  # the 32-bit pattern as int32
    weights = [0.0 if i < 0 else w[i] for i in entries]
    return ids, weights, experts, [total, T]


def oracle_ragged(case: Case) -> tuple[list, list, list, list]:
    groups = oracle_groups(case, "map")
    counts = [len(g) for g in groups]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    gather = [i for g in groups for i in g]
    scatter = [-1] * case.N
    for p, i in enumerate(gather):
        scatter[i] = p
    return counts, offsets, gather + [-1] * (case.N - len(gather)), scatter


SMALL = cases(max_t=30, max_e=10, max_k=4, blocks=[1, 2, 3, 4, 16])


@settings(max_examples=100, deadline=None)
@given(case=SMALL)
def test_oracle_exact(case: Case) -> None:
    out = align_block_size(case.ids, num_experts=case.E, block_size=case.block, expert_map=case.expert_map())
    assert [t.tolist() for t in out] == list(oracle_align(case))

    out = moe_sorting(
        case.ids, case.weights, num_experts=case.E, unit_size=case.block, expert_mask=case.expert_mask()
    )
    assert [t.tolist() for t in out] == list(oracle_sorting(case))

    out = ragged_metadata(case.ids, num_experts=case.E, expert_map=case.expert_map())
    assert [t.tolist() for t in out] == list(oracle_ragged(case))


def test_oracle_worked_example() -> None:
    ids = torch.tensor([[0, 2], [2, 1], [2, 2]], dtype=torch.int32)
    out = align_block_size(ids, num_experts=4, block_size=2)
    # experts 0: [0], 1: [3], 2: [1, 2, 4, 5]; padded 2 + 2 + 4 = 8; bound 4 + (6 - 4) // 2 = 5 blocks
    assert out.sorted_token_ids.tolist() == [0, 6, 3, 6, 1, 2, 4, 5, 6, 6]
    assert out.expert_ids.tolist() == [0, 1, 2, 2, -1]
    assert out.num_tokens_post_padded.tolist() == [8]
    emap = torch.tensor([-1, 1, 0, -1])  # expert 2 -> local 0, expert 1 -> local 1
    rag = ragged_metadata(ids, num_experts=4, expert_map=emap)
    assert rag.expert_counts.tolist() == [4, 1, 0, 0]
    assert rag.expert_offsets.tolist() == [0, 4, 5, 5, 5]
    assert rag.gather_indx.tolist() == [1, 2, 4, 5, 3, -1]
    assert rag.scatter_indx.tolist() == [-1, 0, 1, 4, 2, 3]


# ----------------------------------------------------------------------------- sizes


def _partitions(n: int, parts: int, largest: int | None = None):
    """Multisets of at most ``parts`` positive ints summing to ``n`` (descending)."""
    largest = n if largest is None else largest
    if n == 0:
        yield []
        return
    if parts == 0:
        return
    for first in range(min(n, largest), 0, -1):
        for rest in _partitions(n - first, parts - 1, first):
            yield [first, *rest]


@pytest.mark.parametrize("B", [1, 2, 3, 4, 7])
def test_bound_is_tight_and_sufficient(B: int) -> None:
    """max_num_blocks equals the max of sum(ceil(c_e / B)) over every load on E experts."""
    for N, E in itertools.product(range(13), range(1, 7)):
        worst = max(sum(-(-c // B) for c in p) for p in _partitions(N, E))
        assert max_num_blocks(N, E, B) == worst, (N, E, B)
        assert max_padded_len(N, E, B) == worst * B
        assert max_padded_len(N, E, B) <= min(N + E * (B - 1), N * B)


def test_bound_reached_by_outputs() -> None:
    """The worst load fills every slot: m - 1 experts with one entry, one expert the rest."""
    E, B, T, k = 5, 4, 7, 2
    ids = torch.tensor([[0, 1], [2, 3]] + [[4, 4]] * (T - 2), dtype=torch.int32)
    out = align_block_size(ids, num_experts=E, block_size=B)
    assert int(out.num_tokens_post_padded) == out.sorted_token_ids.numel() == 4 * B + 3 * B
    assert bool((out.expert_ids >= 0).all())
    srt = moe_sorting(ids, torch.ones(T, k), num_experts=E, unit_size=B)
    assert int(srt.num_valid_ids[0]) == srt.sorted_ids.numel()


def test_static_shapes_on_meta_device() -> None:
    """The references never read data to size outputs: they run on the meta device."""
    T, k, E, B = 100, 4, 8, 16
    ids = torch.empty(T, k, dtype=torch.int32, device="meta")
    emap = torch.empty(E, dtype=torch.int64, device="meta")
    out = align_block_size_reference(ids, num_experts=E, block_size=B, expert_map=emap)
    L = max_padded_len(T * k, E, B)
    assert [tuple(t.shape) for t in out] == [(L,), (L // B,), (1,)]
    mask = torch.empty(E, dtype=torch.bool, device="meta")
    w = torch.empty(T, k, dtype=torch.bfloat16, device="meta")
    out = moe_sorting_reference(ids, w, num_experts=E, unit_size=B, expert_mask=mask)
    assert [tuple(t.shape) for t in out] == [(L,), (L,), (L // B,), (2,)]
    assert out.sorted_weights.dtype == torch.float32
    out = ragged_metadata_reference(ids, num_experts=E, expert_map=emap)
    assert [tuple(t.shape) for t in out] == [(E,), (E + 1,), (T * k,), (T * k,)]


# ----------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("ep", [False, True])
def test_empty_batch(ep: bool) -> None:
    E = 6
    ids = torch.empty(0, 3, dtype=torch.int32)
    emap = torch.tensor([0, -1, 1, -1, 2, -1]) if ep else None
    out = align_block_size(ids, num_experts=E, block_size=16, expert_map=emap)
    assert [t.tolist() for t in out] == [[], [], [0]]
    assert all(t.dtype == torch.int32 for t in out)
    mask = None if emap is None else emap >= 0
    out = moe_sorting(ids, torch.empty(0, 3), num_experts=E, unit_size=32, expert_mask=mask)
    assert [t.tolist() for t in out] == [[], [], [], [0, 0]]
    assert out.sorted_weights.dtype == torch.float32
    out = ragged_metadata(ids, num_experts=E, expert_map=emap)
    assert [t.tolist() for t in out] == [[0] * E, [0] * (E + 1), [], []]


def test_all_dropped() -> None:
    ids = torch.tensor([[1, 3], [3, 1]], dtype=torch.int64)
    emap = torch.tensor([0, -1, 1, -1])
    out = align_block_size(ids, num_experts=4, block_size=2, expert_map=emap)
    assert out.num_tokens_post_padded.tolist() == [0]
    assert bool((out.sorted_token_ids == 4).all()) and bool((out.expert_ids == -1).all())
    rag = ragged_metadata(ids, num_experts=4, expert_map=emap)
    assert rag.gather_indx.tolist() == [-1] * 4 and rag.scatter_indx.tolist() == [-1] * 4


def test_packed_slots_above_127() -> None:
    """Slots >= 128 set the sign bit of the int32 pattern; unpacking recovers them."""
    T, k = 3, 200
    g = torch.Generator().manual_seed(0)
    ids = torch.rand(T, 256, generator=g).topk(k, dim=1).indices.to(torch.int32)
    case = Case(ids, torch.rand(T, k, generator=g), 256, 16, None)
    out = moe_sorting(ids, case.weights, num_experts=256, unit_size=16)
    assert bool((out.sorted_ids < 0).any())
    check_sorting(out, case)
    assert [t.tolist() for t in out] == list(oracle_sorting(case))


# ----------------------------------------------------------------------------- errors


IDS = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
W = torch.rand(2, 2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topk_ids": torch.tensor([[0, -1]])}, "negative"),
        ({"topk_ids": torch.tensor([[0, 4]])}, "out of range"),
        ({"topk_ids": IDS.float()}, "dtype"),
        ({"topk_ids": IDS.to(torch.int16)}, "dtype"),
        ({"topk_ids": IDS.reshape(-1)}, "2-D"),
        ({"topk_ids": IDS.reshape(1, 2, 2)}, "2-D"),
        ({"topk_ids": IDS.tolist()}, "torch.Tensor"),
        ({"topk_ids": torch.empty(2, 0, dtype=torch.int32)}, "at least one slot"),
        ({"num_experts": 0}, "num_experts"),
        ({"num_experts": 4.0}, "num_experts"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": -16}, "block_size"),
        ({"block_size": 16.0}, "block_size"),
        ({"block_size": True}, "block_size"),
        ({"expert_map": torch.tensor([0, 1, 2])}, "expert_map"),
        ({"expert_map": torch.tensor([0.0, 1.0, 2.0, 3.0])}, "expert_map"),
        ({"expert_map": torch.tensor([0, 1, 2, 4])}, "expert_map"),
        ({"expert_map": torch.tensor([0, 1, -2, 3])}, "expert_map"),
        ({"expert_map": torch.tensor([0, 1, 1, -1])}, "same local id"),
        ({"expert_map": torch.tensor([[0, 1, 2, 3]])}, "expert_map"),
    ],
)
def test_align_block_size_errors(kwargs: dict, match: str) -> None:
    args = {"topk_ids": IDS, "num_experts": 4, "block_size": 16, **kwargs}
    with pytest.raises(MoEInputError, match=match):
        align_block_size(args.pop("topk_ids"), **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topk_ids": torch.tensor([[0, -1], [0, 1]])}, "negative"),
        ({"topk_ids": torch.tensor([[0, 9], [0, 1]])}, "out of range"),
        ({"topk_ids": IDS.double()}, "dtype"),
        ({"topk_ids": IDS.reshape(-1)}, "2-D"),
        ({"topk_weights": torch.rand(2, 3)}, "topk_weights"),
        ({"topk_weights": torch.rand(4)}, "topk_weights"),
        ({"topk_weights": torch.ones(2, 2, dtype=torch.int32)}, "topk_weights"),
        ({"num_experts": -4}, "num_experts"),
        ({"unit_size": 0}, "unit_size"),
        ({"unit_size": None}, "unit_size"),
        ({"expert_mask": torch.ones(5, dtype=torch.bool)}, "expert_mask"),
        ({"expert_mask": torch.ones(4)}, "expert_mask"),
        ({"expert_mask": [1, 1, 1, 1]}, "expert_mask"),
        ({"topk_ids": torch.zeros(1, 1, dtype=torch.int32).expand(2**24, 1)}, "2\\*\\*24"),
        ({"topk_ids": torch.zeros(1, 256, dtype=torch.int32)}, "256"),
    ],
)
def test_moe_sorting_errors(kwargs: dict, match: str) -> None:
    args = {"topk_ids": IDS, "topk_weights": W, "num_experts": 4, "unit_size": 32, **kwargs}
    with pytest.raises(MoEInputError, match=match):
        moe_sorting(args.pop("topk_ids"), args.pop("topk_weights"), **args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"topk_ids": torch.tensor([[0, -3]])}, "negative"),
        ({"topk_ids": torch.tensor([[4, 0]])}, "out of range"),
        ({"topk_ids": IDS.float()}, "dtype"),
        ({"topk_ids": IDS.reshape(-1)}, "2-D"),
        ({"num_experts": 0}, "num_experts"),
        ({"expert_map": torch.tensor([0, 1, 2, 3, 4])}, "expert_map"),
        ({"expert_map": torch.tensor([0, 1, 2, 3], dtype=torch.int8)}, "expert_map"),
        ({"expert_map": torch.tensor([5, 1, 2, 3])}, "expert_map"),
    ],
)
def test_ragged_metadata_errors(kwargs: dict, match: str) -> None:
    args = {"topk_ids": IDS, "num_experts": 4, **kwargs}
    with pytest.raises(MoEInputError, match=match):
        ragged_metadata(args.pop("topk_ids"), **args)


def test_errors_are_moe_errors() -> None:
    with pytest.raises(moe_core.MoEError):
        align_block_size(IDS, num_experts=4, block_size=0)
    with pytest.raises(ValueError):
        ragged_metadata(IDS, num_experts=2)


# ----------------------------------------------------------------------------- dispatch


class _Recorder:
    def __init__(self, result: object) -> None:
        self.result = result
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def _call(op: str, ids: torch.Tensor, ep: bool):
    emap = torch.tensor([1, 0, -1, 2]) if ep else None
    if op == "align_block_size":
        return align_block_size(ids, num_experts=4, block_size=16, expert_map=emap)
    if op == "moe_sorting":
        return moe_sorting(
            ids,
            torch.rand(ids.shape),
            num_experts=4,
            unit_size=16,
            expert_mask=None if emap is None else emap >= 0,
        )
    return ragged_metadata(ids, num_experts=4, expert_map=emap)


OPS = ["align_block_size", "moe_sorting", "ragged_metadata"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("ep", [False, True])
def test_dispatch_op_is_consulted(monkeypatch: pytest.MonkeyPatch, op: str, ep: bool) -> None:
    sentinel = object()
    impl = _Recorder(sentinel)
    asked = []

    def fake_dispatch(family, name, device, request=None):
        asked.append((family, name, torch.device(device), request))
        return impl

    monkeypatch.setattr(moe_core.sorting, "dispatch_op", fake_dispatch)
    assert _call(op, IDS, ep) is sentinel
    assert len(asked) == 1
    family, name, device, request = asked[0]
    assert (family, name, device.type) == ("sorting", op, "cpu")
    assert request.op == op and request.num_experts == 4 and request.top_k == 2
    assert ("expert_map" in request.features) == ep
    (args, kwargs) = impl.calls[0]
    assert args[0] is IDS
    assert kwargs["num_experts"] == 4
    ep_kw = "expert_mask" if op == "moe_sorting" else "expert_map"
    assert (kwargs[ep_kw] is not None) == ep


@pytest.mark.parametrize("op", OPS)
def test_dispatch_none_falls_back_to_reference(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    monkeypatch.setattr(moe_core.sorting, "dispatch_op", lambda *a, **k: None)
    out = _call(op, IDS, ep=False)
    assert type(out).__name__ in ("AlignedBlocks", "SortedTokens", "RaggedMetadata")
    assert out[0].numel() > 0


@pytest.mark.parametrize("op", OPS)
def test_empty_batch_skips_kernels(monkeypatch: pytest.MonkeyPatch, op: str) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("dispatch_op must not be called for T == 0")

    monkeypatch.setattr(moe_core.sorting, "dispatch_op", boom)
    _call(op, torch.empty(0, 2, dtype=torch.int32), ep=False)


@pytest.mark.parametrize("op", OPS)
def test_registered_kernel_is_used(op: str) -> None:
    """Through the real registry: a higher-priority sorting kernel wins, if it supports the request."""
    sentinel = object()
    impl = _Recorder(sentinel)
    get_registry().add(
        KernelEntry(name=f"testplug.fake.{op}", family="sorting", op=op, apply=impl, priority=100),
        plugin="testplug",
    )
    assert _call(op, IDS, ep=False) is sentinel
    # the fake does not declare the ``expert_map`` feature: EP requests go elsewhere
    assert _call(op, IDS, ep=True) is not sentinel
    assert len(impl.calls) == 1
