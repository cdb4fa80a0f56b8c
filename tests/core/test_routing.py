"""select_experts: every method against an independent float64 per-token computation."""

from __future__ import annotations

import math

import pytest
import torch

import moe_core
from moe_core import KernelEntry, MoEInputError, RoutingSpec, select_experts
from moe_core.routing import select_experts_reference


def _rank(scores: list[float], k: int) -> list[int]:
    """Indices of the k largest, ties to the lowest index (plain Python)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:k]


def oracle(logits: torch.Tensor, r: RoutingSpec, bias: torch.Tensor | None) -> tuple[list, list]:
    """Per-token float64 routing, written from the DESIGN text, independent of moe_core."""
    all_w, all_ids = [], []
    E = logits.shape[1]
    for row in logits.double().tolist():
        if r.method == "softmax":
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            probs = [v / sum(ex) for v in ex]
            ids = _rank(probs, r.top_k)
            w = [probs[i] for i in ids]
        elif r.method == "softmax_after_topk":
            ids = _rank(row, r.top_k)
            m = max(row[i] for i in ids)
            ex = [math.exp(row[i] - m) for i in ids]
            w = [v / sum(ex) for v in ex]
        elif r.method == "sigmoid":
            ids = _rank(row, r.top_k)
            w = [1 / (1 + math.exp(-row[i])) for i in ids]
        else:
            s = [1 / (1 + math.exp(-v)) for v in row]
            b = bias.double().tolist() if bias is not None else [0.0] * E
            choice = [s[i] + b[i] for i in range(E)]
            G = r.num_expert_group or 1
            size = E // G
            gscore = [sum(sorted(choice[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(G)]
            keep = set(_rank(gscore, r.topk_group or G))
            masked = [choice[i] if i // size in keep else -math.inf for i in range(E)]
            ids = _rank(masked, r.top_k)
            w = [s[i] for i in ids]
        if r.renormalize and r.method != "softmax_after_topk":
            total = sum(w)
            w = [v / total for v in w]
        w = [v * r.routed_scaling_factor for v in w]
        ids = ids + [E + j for j in range(r.num_fused_shared_experts)]
        w = w + [1.0] * r.num_fused_shared_experts
        all_w.append(w)
        all_ids.append(ids)
    return all_w, all_ids


CASES = [
    RoutingSpec("softmax", 2, renormalize=True),
    RoutingSpec("softmax", 8, renormalize=False),
    RoutingSpec("softmax_after_topk", 4),
    RoutingSpec("sigmoid", 1),
    RoutingSpec("sigmoid", 3, renormalize=True, routed_scaling_factor=1.5),
    RoutingSpec("biased_grouped", 8, True, 8, 4, 2.5, num_fused_shared_experts=1),
    RoutingSpec("biased_grouped", 6, False, 4, 2, 1.0),
    RoutingSpec("biased_grouped", 2, True),  # one group: sigmoid + bias, no group pruning
]


@pytest.mark.parametrize("routing", CASES, ids=lambda r: f"{r.method}-k{r.top_k}-g{r.num_expert_group}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 37])
def test_matches_float64_oracle(routing, dtype, T):
    E = 64
    gen = torch.Generator().manual_seed(T * 1000 + routing.top_k)
    logits = (torch.randn(T, E, generator=gen) * 2).to(dtype)
    bias = torch.randn(E, generator=gen) * 0.2 if routing.method == "biased_grouped" else None
    weights, ids = select_experts(logits, routing, correction_bias=bias)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32
    assert weights.shape == ids.shape == (T, routing.num_slots)
    want_w, want_ids = oracle(logits, routing, bias)
    assert ids.tolist() == want_ids
    torch.testing.assert_close(
        weights.double(), torch.tensor(want_w, dtype=torch.float64), rtol=1e-6, atol=1e-7
    )


def test_ties_go_to_lowest_expert_id():
    logits = torch.zeros(3, 16)
    logits[1, [3, 9, 12]] = 1.0
    for r in (RoutingSpec("softmax", 2), RoutingSpec("sigmoid", 2), RoutingSpec("softmax_after_topk", 2)):
        _, ids = select_experts(logits, r)
        assert ids[0].tolist() == [0, 1] and ids[1].tolist() == [3, 9] and ids[2].tolist() == [0, 1]
    # group ties: every group scores the same, the lowest groups are kept
    _, ids = select_experts(torch.zeros(1, 16), RoutingSpec("biased_grouped", 4, False, 4, 2))
    assert ids[0].tolist() == [0, 1, 2, 3]


def test_bias_changes_choice_not_weights():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 5.0])
    r = RoutingSpec("biased_grouped", 2, renormalize=False)
    weights, ids = select_experts(logits, r, correction_bias=bias)
    assert ids.tolist() == [[3, 0]]
    torch.testing.assert_close(weights, torch.sigmoid(torch.tensor([[-1.0, 2.0]])))


def test_group_pruning_excludes_strong_expert_in_weak_group():
    # group 1 has the single best expert but a weak second; groups scored by the sum of top-2
    logits = torch.tensor([[1.0, 1.0, 5.0, -9.0, 0.9, 0.9, -9.0, -9.0]])
    r = RoutingSpec("biased_grouped", 2, False, num_expert_group=4, topk_group=1)
    _, ids = select_experts(logits, r)
    assert sorted(ids[0].tolist()) == [0, 1]


def test_empty_batch():
    for r in CASES:
        w, ids = select_experts(torch.empty(0, 64), r, correction_bias=None)
        assert w.shape == ids.shape == (0, r.num_slots)


@pytest.mark.parametrize(
    ("logits", "routing", "bias", "match"),
    [
        (torch.randn(4, 8, dtype=torch.float64).int(), RoutingSpec("softmax", 2), None, "floating"),
        (torch.randn(4, 8, 2), RoutingSpec("softmax", 2), None, "2-D"),
        (torch.randn(4, 8), RoutingSpec("softmax", 9), None, "exceeds"),
        (torch.randn(4, 8), RoutingSpec("softmax", 2), torch.zeros(8), "only applies"),
        (torch.randn(4, 8), RoutingSpec("biased_grouped", 2), torch.zeros(7), "shape"),
        (torch.randn(4, 9), RoutingSpec("biased_grouped", 2, num_expert_group=2), None, "groups"),
        (
            torch.randn(4, 8),
            RoutingSpec("biased_grouped", 5, num_expert_group=4, topk_group=2),
            None,
            "kept groups",
        ),
        (torch.randn(4, 8), "softmax", None, "RoutingSpec"),
    ],
)
def test_bad_inputs(logits, routing, bias, match):
    with pytest.raises(MoEInputError, match=match):
        select_experts(logits, routing, correction_bias=bias)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"method": "topk"},
        {"top_k": 0},
        {"num_expert_group": 2},
        {"method": "biased_grouped", "num_expert_group": 2, "topk_group": 3},
        {"num_fused_shared_experts": -1},
    ],
)
def test_bad_routing_spec(kwargs):
    with pytest.raises(MoEInputError):
        RoutingSpec(**kwargs)


def test_dispatches_to_registered_kernel():
    calls = []

    def fake(logits, routing, bias):
        calls.append(routing.method)
        w, i = select_experts_reference(logits, routing, bias)
        return w * 0 + 0.5, i

    class Plugin:
        @moe_core.hookimpl
        def register_kernels(self, register):
            register(
                KernelEntry(
                    "fake.torch.routing", "routing", fake, features={"softmax"}, capability="cpu", priority=10
                )
            )

    from moe_core.plugins import plugin_manager

    plugin_manager().load_module("fake", Plugin())
    w, _ = select_experts(torch.randn(3, 8), RoutingSpec("softmax", 2))
    assert calls == ["softmax"] and torch.all(w == 0.5)
    # a method the fake kernel does not declare falls back to the reference
    w, _ = select_experts(torch.randn(3, 8), RoutingSpec("sigmoid", 2))
    assert calls == ["softmax"] and not torch.all(w == 0.5)
