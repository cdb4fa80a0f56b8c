"""The example plugin's own tests; the contract itself is checked by moe-core's conformance kit:

pytest --pyargs moe_core.conformance --moe-kernel example.torch.loop
"""

from __future__ import annotations

import pytest
import torch
from moe_plugin_example.plugin import NAME

import moe_core as moe
from moe_core.testing import random_expert_weights, random_routing, relative_error, tolerance


@pytest.fixture(autouse=True)
def _only_this_plugin(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MOE_LOAD_PLUGINS", "example")
    monkeypatch.delenv("MOE_BACKEND", raising=False)
    moe.reset_plugins()
    yield
    moe.reset_plugins()


def test_registered_and_planned_when_forced() -> None:
    spec = moe.MoESpec(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, dtype=torch.float32)
    assert moe.moe_plan(spec, "cpu").kernel == "reference.torch.experts"  # priority -10 < 0
    plan = moe.moe_plan(spec, "cpu", backend="example")
    assert plan.kernel == NAME
    weights = random_expert_weights(spec)
    x = torch.randn(5, 64)
    topk_weights, topk_ids = random_routing(moe.RoutingSpec(top_k=2), 5, 8)
    out = moe.moe_apply(plan, x, plan.prepare(weights), topk_weights, topk_ids)
    want = moe.reference.fused_experts_reference(spec, x, weights, topk_weights, topk_ids)
    assert relative_error(out, want) <= tolerance(spec)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"activation": "gelu"}, "activation gelu not supported"),
        ({"quant": "fp8"}, "quant fp8 not supported"),
        ({"has_bias": True}, "feature bias not supported"),
        ({"quant": "bf16", "dtype": torch.float16}, "must share a dtype"),
    ],
)
def test_refusals_say_why(changes: dict, reason: str) -> None:
    spec = moe.MoESpec(num_experts=8, top_k=2, hidden_size=64, intermediate_size=32, **changes)
    plan = moe.moe_plan(spec, "cpu")  # the reference takes it; the example says why it does not
    assert reason in plan.explain()
