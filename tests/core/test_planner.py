"""Kernel selection, plan.explain(), prepare/apply, the custom ops."""

from __future__ import annotations

import re

import pytest
import torch

import moe_core
from moe_core import KernelEntry, MoESpec, UnsupportedError, moe_apply, moe_plan
from moe_core.plugins import plugin_manager
from moe_core.reference import _apply, _prepare, fused_experts_reference
from moe_core.testing import random_expert_weights, random_routing, relative_error, tolerance

SPEC = MoESpec(num_experts=8, top_k=2, hidden_size=48, intermediate_size=40)


def _entry(name, **kw):
    base = {"family": "experts", "apply": _apply, "prepare": _prepare, "needs_contiguous": False}
    base.update(kw)
    return KernelEntry(name, **base)


def _install(*entries, plugin="fake"):
    class Plugin:
        @moe_core.hookimpl
        def register_kernels(self, register):
            for e in entries:
                register(e)

    record = plugin_manager().load_module(plugin, Plugin())
    assert record.status == "loaded", record.error


def test_reference_is_default_on_cpu():
    plan = moe_plan(SPEC, "cpu")
    assert plan.kernel == "reference.torch.experts" and plan.entry.plugin == "reference"
    text = plan.explain()
    assert "chosen: reference.torch.experts" in text and "CHOSEN" in text


def test_priority_then_name_and_explain_reasons():
    _install(
        _entry("fake.a.high", priority=50, capability="cuda>=9.0,<10.0"),
        _entry("fake.b.mid", priority=20, capability="cpu"),
        _entry("fake.a.mid", priority=20, capability="cpu"),
        _entry("fake.c.nofp8", priority=90, quant={"fp8"}, capability="cpu"),
        _entry("fake.d.nosilu", priority=90, activations={"gelu"}, capability="cpu"),
        _entry(
            "fake.e.says_no",
            priority=90,
            capability="cpu",
            supports=lambda s, d: "H must be a multiple of 64",
        ),
        _entry("fake.f.raises", priority=90, capability="cpu", supports=lambda s, d: 1 / 0),
    )
    plan = moe_plan(SPEC, "cpu")
    assert plan.kernel == "fake.a.mid"  # priority 20 tie broken by name
    text = plan.explain()
    assert "fake.b.mid" in text and "usable, lower priority" in text
    assert "refused: needs a nvidia device (cuda>=9.0,<10.0); device is cpu" in text
    assert "quant bf16 not supported (has fp8)" in text
    assert "activation silu not supported (has gelu)" in text
    assert "H must be a multiple of 64" in text
    assert "supports() raised ZeroDivisionError" in text
    # the same registry on a (simulated) H100 picks the Hopper kernel
    assert moe_plan(SPEC, "sm_90").kernel == "fake.a.high"


def test_rank_sets_the_priority_per_request():
    def rank(spec, device):
        return 5 if spec.activation == "gelu" else 40  # "measured slower than its peer for gelu"

    _install(
        _entry("fake.peer.any", priority=20, capability="cpu"),
        _entry("fake.ranked.x", priority=90, rank=rank, capability="cpu"),
        _entry("fake.broken.rank", priority=1, rank=lambda s, d: 1 / 0, capability="cpu"),
        _entry("fake.bool.rank", priority=2, rank=lambda s, d: True, capability="cpu"),
    )
    plan = moe_plan(SPEC, "cpu")
    assert plan.kernel == "fake.ranked.x"
    assert "priority 40" in plan.explain() and re.search(r"fake\.ranked\.x +p=40 ", plan.explain())
    gelu = moe_plan(MoESpec(8, 2, 48, 40, activation="gelu"), "cpu")
    assert gelu.kernel == "fake.peer.any"
    text = gelu.explain()
    assert re.search(r"fake\.ranked\.x +p=5 +usable, lower priority", text)
    # a rank that raises or is not an int counts as the static priority
    by_name = {c.name: c.rank for c in gelu.candidates}
    assert by_name["fake.broken.rank"] == 1 and by_name["fake.bool.rank"] == 2
    with pytest.raises(ValueError, match="rank must be callable"):
        _entry("fake.bad.rank", rank=3)


def test_features_are_required():
    _install(_entry("fake.x.plain", priority=10, capability="any"))
    assert moe_plan(SPEC, "cpu").kernel == "fake.x.plain"
    for spec, feature in (
        (SPEC.replace(has_bias=True), "bias"),
        (SPEC.replace(ep_size=2, ep_rank=1), "expert_parallel"),
        (SPEC.replace(top_k=1, apply_router_weight_on_input=True), "router_weight_on_input"),
    ):
        plan = moe_plan(spec, "cpu")
        assert plan.kernel == "reference.torch.experts"
        assert f"feature {feature} not supported" in plan.explain()


def test_forced_backend(monkeypatch):
    _install(_entry("fake.x.fast", priority=10, capability="cpu"), _entry("fake.y.gpu", capability="gpu"))
    assert moe_plan(SPEC, "cpu", backend="reference").kernel == "reference.torch.experts"
    assert moe_plan(SPEC, "cpu", backend="reference.torch.experts").kernel == "reference.torch.experts"
    monkeypatch.setenv("MOE_BACKEND", "reference")
    plan = moe_plan(SPEC, "cpu")
    assert plan.kernel == "reference.torch.experts" and "backend forced: reference" in plan.explain()
    assert "not selected: backend forced" in plan.explain()
    assert moe_plan(SPEC, "cpu", backend="fake.x").kernel == "fake.x.fast"  # argument wins over env
    with pytest.raises(UnsupportedError, match="needs a GPU"):
        moe_plan(SPEC, "cpu", backend="fake.y")
    with pytest.raises(UnsupportedError, match="matches no registered"):
        moe_plan(SPEC, "cpu", backend="nosuch")
    with pytest.raises(UnsupportedError, match="matches no registered"):
        moe_plan(SPEC, "cpu", backend="fake.x.fa")  # prefixes end at a dot


def test_unsupported_lists_every_reason():
    _install(_entry("fake.only.fp8", quant={"fp8"}, capability="cpu"))
    with pytest.raises(UnsupportedError) as info:
        moe_plan(SPEC, "gfx950", backend="fake")
    assert "fake.only.fp8: needs a nvidia" not in str(info.value)
    assert "fake.only.fp8: needs a cpu device" in str(info.value)


def _layer(spec, T, seed=0):
    weights = random_expert_weights(spec, seed=seed)
    x = torch.randn(T, spec.hidden_size, generator=torch.Generator().manual_seed(seed + 1)).to(spec.dtype)
    routing = moe_core.RoutingSpec("softmax", spec.top_k, renormalize=True)
    topk_w, topk_ids = random_routing(routing, T, spec.num_experts, seed=seed + 2)
    return weights, x, topk_w, topk_ids


@pytest.mark.parametrize("T", [1, 7, 33])
def test_apply_matches_reference_and_overwrites_poisoned_out(T):
    plan = moe_plan(SPEC, "cpu")
    weights, x, topk_w, topk_ids = _layer(SPEC, T)
    prepared = plan.prepare(weights)
    out = torch.full((T, SPEC.hidden_size), float("nan"), dtype=SPEC.dtype)
    result = moe_apply(plan, x, prepared, topk_w, topk_ids, out=out)
    assert result.data_ptr() == out.data_ptr()
    expected = fused_experts_reference(SPEC, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert relative_error(out, expected) <= tolerance(SPEC)
    fresh = moe_apply(plan, x, prepared, topk_w, topk_ids)
    assert fresh.dtype == SPEC.dtype and torch.equal(fresh, out)


def test_empty_batch_launches_nothing():
    calls = []

    def spy(*args):
        calls.append(args)

    _install(_entry("fake.spy.experts", apply=spy, priority=10, capability="cpu"))
    plan = moe_plan(SPEC, "cpu")
    prepared = plan.prepare(random_expert_weights(SPEC))
    out = moe_apply(
        plan,
        torch.empty(0, 48, dtype=SPEC.dtype),
        prepared,
        torch.empty(0, 2),
        torch.empty(0, 2, dtype=torch.int32),
    )
    assert out.shape == (0, 48) and out.dtype == SPEC.dtype and calls == []


def test_prepared_for_another_kernel_is_refused():
    _install(_entry("fake.x.fast", priority=10, capability="cpu"))
    plan_a = moe_plan(SPEC, "cpu")
    plan_b = moe_plan(SPEC, "cpu", backend="reference")
    weights, x, w, ids = _layer(SPEC, 3)
    with pytest.raises(moe_core.MoEInputError, match=r"prepared for fake\.x\.fast"):
        moe_apply(plan_b, x, plan_a.prepare(weights), w, ids)


def test_simulated_plan_prepares_but_does_not_run():
    plan = moe_plan(SPEC, "sm_90")
    weights, x, w, ids = _layer(SPEC, 3)
    prepared = plan.prepare(weights)  # plugins test their prepare() on the CPU this way
    with pytest.raises(moe_core.MoEInputError, match="simulated"):
        moe_apply(plan, x, prepared, w, ids)


def test_custom_ops_opcheck():
    plan = moe_plan(SPEC, "cpu")
    weights, x, w, ids = _layer(SPEC, 5)
    prepared = plan.prepare(weights)
    args = (x, w, ids, list(prepared.tensors.values()), plan.handle, prepared.layout_handle)
    torch.library.opcheck(torch.ops.moe_core.moe_apply.default, args)
    out = torch.empty_like(x)
    torch.library.opcheck(torch.ops.moe_core.moe_apply_out.default, (*args, out))
    logits = torch.randn(5, 16)
    torch.library.opcheck(
        torch.ops.moe_core.select_experts.default,
        (logits, torch.randn(16), "biased_grouped", 4, True, 4, 2, 2.5, 1),
    )


def test_torch_compile_traces_the_whole_layer():
    plan = moe_plan(SPEC, "cpu")
    weights, x, _, _ = _layer(SPEC, 9)
    prepared = plan.prepare(weights)
    routing = moe_core.RoutingSpec("softmax", 2, renormalize=True)
    logits = torch.randn(9, SPEC.num_experts)

    def layer(x, logits):
        w, ids = moe_core.select_experts(logits, routing)
        return moe_apply(plan, x, prepared, w, ids)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, logits), layer(x, logits), rtol=0, atol=0)

    def layer_out(x, logits, out):
        w, ids = moe_core.select_experts(logits, routing)
        return moe_apply(plan, x, prepared, w, ids, out=out)

    out = torch.empty_like(x)
    torch.compile(layer_out, backend="aot_eager", fullgraph=True)(x, logits, out)
    torch.testing.assert_close(out, layer(x, logits), rtol=0, atol=0)
