"""Conformance of ``sorting`` kernels: the contracts of :mod:`moe_core.sorting`, checked as invariants.

The kernel's op (``align_block_size``, ``moe_sorting`` or ``ragged_metadata``)
is called through its ``apply`` with the keyword signature of the same-named
function, on small odd shapes, int32 and int64 ids (one case strided), with and without an
expert map / mask (feature ``expert_map``), and with ids outside ``[0, E)``
(unchecked, a kernel must drop them). The outputs are checked by
:mod:`moe_core.testing.invariants`, written from the contract text: exact
shapes, dtypes and device; every kept entry placed once in a block of its
(local) expert, blocks ascending, padding and tails as specified; any order
within one expert for ``align_block_size`` and ``moe_sorting``, the exact
stable order for ``ragged_metadata``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from ..device import DeviceInfo
from ..registry import KernelEntry
from ..sorting import SortingRequest
from ..testing import check_aligned_blocks, check_ragged_metadata, check_sorted_tokens
from ._kit import Case, assert_unchanged, cases, generator, parametrize, snapshot, strided

#: (T, k, E, block): odd sizes; blocks of 1, odd and powers of two
SHAPES = [(1, 1, 7, 16), (9, 3, 7, 1), (13, 3, 33, 16), (40, 4, 7, 64), (25, 2, 5, 3)]
INT64_SHAPES = {(13, 3, 33, 16), (40, 4, 7, 64)}
MAP_SHAPES = {(9, 3, 7, 1), (13, 3, 33, 16), (40, 4, 7, 64)}


@dataclass(frozen=True, kw_only=True)
class SortingCase(Case):
    tokens: int
    top_k: int
    num_experts: int
    block: int | None
    ids_dtype: torch.dtype = torch.int32
    expert_map: bool = False
    out_of_range: bool = False
    weights_dtype: torch.dtype = torch.float32
    strided: bool = False  # topk_ids (and weights) strided views


def build_cases(
    entry: KernelEntry, device: torch.device, info: DeviceInfo
) -> Iterator[tuple[str, SortingCase]]:
    op = entry.op
    blocked = op != "ragged_metadata"
    seen = set()
    for T, k, E, B in SHAPES:
        block = B if blocked else None
        if (T, k, E, block) in seen:
            continue
        seen.add((T, k, E, block))
        shape = f"T={T},k={k},E={E}" + (f",block={B}" if blocked else "")
        variants = [("", {})]
        if (T, k, E, B) in INT64_SHAPES:
            variants.append((",ids=int64", {"ids_dtype": torch.int64}))
        if (T, k, E, B) in MAP_SHAPES:
            variants.append((",expert_map" if op != "moe_sorting" else ",expert_mask", {"expert_map": True}))
        if (T, k, E, B) == (13, 3, 33, 16):
            variants.append((",out_of_range_ids", {"out_of_range": True}))
            variants.append((",out_of_range_ids,ids=int64", {"out_of_range": True, "ids_dtype": torch.int64}))
            variants.append((",strided_ids", {"strided": True}))
        if op == "moe_sorting" and (T, k, E, B) == (9, 3, 7, 1):
            variants.append((",weights=bfloat16", {"weights_dtype": torch.bfloat16}))
        for suffix, extra in variants:
            request = SortingRequest(
                op, E, k, block, extra.get("ids_dtype", torch.int32), extra.get("expert_map", False)
            )
            yield (
                "sorting",
                SortingCase(
                    entry=entry,
                    label=f"{op}:{shape}{suffix}",
                    refusal=entry.refusal(request, info),
                    tokens=T,
                    top_k=k,
                    num_experts=E,
                    block=block,
                    **extra,
                ),
            )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc, "sorting", build_cases)


def make_ids(case: SortingCase, gen: torch.Generator) -> torch.Tensor:
    """Distinct experts per token (a router's top-k), a quarter of them out of range if asked."""
    T, k, E = case.tokens, case.top_k, case.num_experts
    ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k]
    if case.out_of_range:
        bad = [-1, E, E + 9, -(2**31)]
        if case.ids_dtype == torch.int64:  # would wrap into [0, E) if narrowed to int32 first
            bad += [2**32, 2**32 + E - 1]
        bad_t = torch.tensor(bad, dtype=torch.int64)
        pick = torch.rand(T, k, generator=gen) < 0.25
        ids = torch.where(pick, bad_t[torch.randint(0, len(bad), (T, k), generator=gen)], ids)
    return ids.to(case.ids_dtype)


def make_map(case: SortingCase, gen: torch.Generator) -> torch.Tensor:
    """About half of the experts local, numbered in shuffled order; the rest -1."""
    E = case.num_experts
    local = torch.randperm(E, generator=gen)[: max(1, E // 2)]
    emap = torch.full((E,), -1, dtype=torch.int64)
    emap[local] = torch.randperm(local.numel(), generator=gen)
    return emap.to(torch.int32)


@cases("sorting")
def test_contract(case: SortingCase, moe_device: torch.device) -> None:
    gen = generator(case.seed)
    E, op = case.num_experts, case.entry.op
    ids = make_ids(case, gen).to(moe_device)
    if case.strided:
        ids = strided(ids)
    emap = make_map(case, gen).to(moe_device) if case.expert_map else None
    inputs = {"topk_ids": ids} if emap is None else {"topk_ids": ids, "expert_map": emap}
    if op == "align_block_size":
        before = snapshot(inputs)
        out = case.entry.apply(ids, num_experts=E, block_size=case.block, expert_map=emap)
        assert_unchanged(inputs, before, case.entry.name)
        check_aligned_blocks(out, ids, num_experts=E, block_size=case.block, expert_map=emap)
    elif op == "moe_sorting":
        weights = torch.rand(ids.shape, generator=gen).to(case.weights_dtype).to(moe_device)
        if case.strided:
            weights = strided(weights)
        mask = None if emap is None else (emap >= 0).to(torch.uint8)
        inputs = {"topk_ids": ids, "topk_weights": weights}
        if mask is not None:
            inputs["expert_mask"] = mask
        before = snapshot(inputs)
        out = case.entry.apply(ids, weights, num_experts=E, unit_size=case.block, expert_mask=mask)
        assert_unchanged(inputs, before, case.entry.name)
        check_sorted_tokens(out, ids, weights, num_experts=E, unit_size=case.block, expert_mask=mask)
    else:
        before = snapshot(inputs)
        out = case.entry.apply(ids, num_experts=E, expert_map=emap)
        assert_unchanged(inputs, before, case.entry.name)
        check_ragged_metadata(out, ids, num_experts=E, expert_map=emap)
