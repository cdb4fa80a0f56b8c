"""Conformance of ``routing`` kernels: ``select_experts`` against :func:`select_experts_reference`.

One case per routing configuration (each method; renormalization, scaling,
groups, correction bias, fused shared experts) and logits dtype; a kernel is
asked ``entry.refusal(RoutingRequest, device)`` and skipped where it refuses
(its declared ``features`` name the methods it implements). The kernel's
``apply(logits, routing, correction_bias)`` must return float32 weights and
int32 ids ``[T, top_k + shared]``, contiguous, ids equal to the reference
(ties to the lowest index, in descending score order), weights within 1e-5,
and leave the logits alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from ..device import DeviceInfo
from ..registry import KernelEntry
from ..routing import RoutingRequest, RoutingSpec, select_experts_reference
from ..testing import check_routing
from ._kit import Case, assert_unchanged, cases, generator, parametrize, snapshot, strided

TOKENS = 9

#: (label, routing, number of experts, with a correction bias)
CONFIGS: list[tuple[str, RoutingSpec, int, bool]] = [
    ("softmax", RoutingSpec("softmax", top_k=3), 15, False),
    ("softmax,renormalize", RoutingSpec("softmax", top_k=3, renormalize=True), 15, False),
    ("softmax_after_topk", RoutingSpec("softmax_after_topk", top_k=3), 15, False),
    ("sigmoid,top_k=1", RoutingSpec("sigmoid", top_k=1), 15, False),
    (
        "sigmoid,renormalize,scaled",
        RoutingSpec("sigmoid", top_k=3, renormalize=True, routed_scaling_factor=2.5),
        15,
        False,
    ),
    (
        "biased_grouped",
        RoutingSpec(
            "biased_grouped",
            top_k=3,
            renormalize=True,
            num_expert_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
        ),
        16,
        True,
    ),
    ("biased_grouped,no_bias,one_group", RoutingSpec("biased_grouped", top_k=3), 15, False),
    (
        "biased_grouped,fused_shared_experts=1",
        RoutingSpec(
            "biased_grouped",
            top_k=3,
            renormalize=True,
            num_expert_group=4,
            topk_group=2,
            num_fused_shared_experts=1,
        ),
        16,
        True,
    ),
    (
        "softmax,fused_shared_experts=2",
        RoutingSpec("softmax", top_k=2, num_fused_shared_experts=2),
        15,
        False,
    ),
]

#: Labels of the configurations also run with 16-bit logits and with one token.
MORE_DTYPES = ("softmax", "biased_grouped")


@dataclass(frozen=True, kw_only=True)
class RoutingCase(Case):
    routing: RoutingSpec
    num_experts: int
    bias: bool
    dtype: torch.dtype = torch.float32
    tokens: int = TOKENS
    strided: bool = False  # the logits a strided view (select_experts accepts them)


def build_cases(
    entry: KernelEntry, device: torch.device, info: DeviceInfo
) -> Iterator[tuple[str, RoutingCase]]:
    for label, routing, experts, bias in CONFIGS:
        variants: list[tuple[str, torch.dtype, int]] = [("", torch.float32, TOKENS)]
        if label in MORE_DTYPES:
            variants += [
                (",logits=bfloat16", torch.bfloat16, TOKENS),
                (",logits=float16", torch.float16, TOKENS),
            ]
            variants += [(",tokens=1", torch.float32, 1), (",strided_logits", torch.float32, TOKENS)]
        for suffix, dtype, tokens in variants:
            request = RoutingRequest(routing, experts, dtype, bias)
            yield (
                "routing",
                RoutingCase(
                    entry=entry,
                    label=label + suffix,
                    refusal=entry.refusal(request, info),
                    routing=routing,
                    num_experts=experts,
                    bias=bias,
                    dtype=dtype,
                    tokens=tokens,
                    strided=suffix == ",strided_logits",
                ),
            )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    parametrize(metafunc, "routing", build_cases)


@cases("routing")
def test_matches_reference(case: RoutingCase, moe_device: torch.device) -> None:
    gen = generator(case.seed)
    logits = torch.randn(case.tokens, case.num_experts, generator=gen).to(case.dtype).to(moe_device)
    if case.strided:
        logits = strided(logits)
    bias = None
    if case.bias:
        bias = (torch.randn(case.num_experts, generator=gen) * 0.1).to(moe_device)
    inputs = {"logits": logits} if bias is None else {"logits": logits, "correction_bias": bias}
    before = snapshot(inputs)
    got = case.entry.apply(logits, case.routing, bias)
    assert_unchanged(inputs, before, case.entry.name)
    check_routing(tuple(got), select_experts_reference(logits, case.routing, bias))
