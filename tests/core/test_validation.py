"""Every class of bad input raises MoEInputError before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import moe_core
from moe_core import ExpertWeights, KernelEntry, MoEInputError, MoESpec, moe_apply, moe_plan
from moe_core.plugins import plugin_manager
from moe_core.testing import random_expert_weights

SPEC = MoESpec(num_experts=8, top_k=2, hidden_size=32, intermediate_size=16)
CALLS: list[str] = []


def _spy_apply(spec, x, prepared, w, ids, out):
    CALLS.append("apply")
    out.zero_()


def _spy_prepare(spec, weights, device):
    CALLS.append("prepare")
    return weights.tensors()


@pytest.fixture
def spy_plan():
    class Plugin:
        @moe_core.hookimpl
        def register_kernels(self, register):
            register(
                KernelEntry(
                    "spy.torch.experts",
                    "experts",
                    _spy_apply,
                    prepare=_spy_prepare,
                    capability="cpu",
                    priority=100,
                    features={"bias", "expert_parallel"},
                )
            )

    plugin_manager().load_module("spy", Plugin())
    CALLS.clear()
    plan = moe_plan(SPEC, "cpu")
    assert plan.kernel == "spy.torch.experts"
    prepared = plan.prepare(random_expert_weights(SPEC))
    CALLS.clear()
    return plan, prepared


def _good(T=4):
    x = torch.randn(T, 32, dtype=torch.bfloat16)
    w = torch.rand(T, 2)
    ids = torch.randint(0, 8, (T, 2), dtype=torch.int32)
    return x, w, ids


def test_good_inputs_reach_the_kernel(spy_plan):
    plan, prepared = spy_plan
    moe_apply(plan, *_good()[:1], prepared, *_good()[1:])
    assert CALLS == ["apply"]


BAD_APPLY = {
    "id out of range": lambda x, w, ids: (x, w, ids.index_fill(0, torch.tensor([1]), 8)),
    "negative id": lambda x, w, ids: (x, w, ids.index_fill(0, torch.tensor([2]), -1)),
    "float ids": lambda x, w, ids: (x, w, ids.float()),
    "int16 ids": lambda x, w, ids: (x, w, ids.to(torch.int16)),
    "int weights": lambda x, w, ids: (x, w.int(), ids),
    "1-D ids": lambda x, w, ids: (x, w, ids[:, 0]),
    "top_k mismatch": lambda x, w, ids: (x, w[:, :1], ids[:, :1]),
    "ids tokens mismatch": lambda x, w, ids: (x, w, ids[:3]),
    "weights shape mismatch": lambda x, w, ids: (x, w[:, :1], ids),
    "hidden size": lambda x, w, ids: (x[:, :31], w, ids),
    "hidden 3-D": lambda x, w, ids: (x[None], w, ids),
    "hidden dtype": lambda x, w, ids: (x.half(), w, ids),
    "hidden int": lambda x, w, ids: (x.int(), w, ids),
    "non-contiguous": lambda x, w, ids: (torch.randn(32, 4, dtype=torch.bfloat16).t(), w, ids),
    "device mismatch": lambda x, w, ids: (x, w.to("meta"), ids),
    "not a tensor": lambda x, w, ids: (x.tolist(), w, ids),
}


@pytest.mark.parametrize("case", sorted(BAD_APPLY))
def test_bad_apply_inputs(spy_plan, case):
    plan, prepared = spy_plan
    x, w, ids = BAD_APPLY[case](*_good())
    with pytest.raises(MoEInputError):
        moe_apply(plan, x, prepared, w, ids)
    assert CALLS == []


@pytest.mark.parametrize(
    "out",
    [
        torch.empty(4, 31, dtype=torch.bfloat16),
        torch.empty(4, 32, dtype=torch.float32),
        torch.empty(32, 4, dtype=torch.bfloat16).t(),
        "buffer",
    ],
)
def test_bad_out(spy_plan, out):
    plan, prepared = spy_plan
    x, w, ids = _good()
    with pytest.raises(MoEInputError):
        moe_apply(plan, x, prepared, w, ids, out=out)
    assert CALLS == []


def test_bad_plan_and_prepared(spy_plan):
    plan, prepared = spy_plan
    x, w, ids = _good()
    with pytest.raises(MoEInputError, match="MoEPlan"):
        moe_apply("plan", x, prepared, w, ids)
    with pytest.raises(MoEInputError, match="prepare"):
        moe_apply(plan, x, prepared.tensors, w, ids)
    with pytest.raises(MoEInputError, match="MoESpec"):
        moe_plan({"num_experts": 8})
    assert CALLS == []


def _weights(**changes):
    w = random_expert_weights(SPEC)
    for k, v in changes.items():
        setattr(w, k, v)
    return w


BAD_WEIGHTS = {
    "w13 rows": (SPEC, lambda: _weights(w13=torch.randn(8, 31, 32, dtype=torch.bfloat16))),
    "w13 experts": (SPEC, lambda: _weights(w13=torch.randn(7, 32, 32, dtype=torch.bfloat16))),
    "w2 shape": (SPEC, lambda: _weights(w2=torch.randn(8, 16, 32, dtype=torch.bfloat16))),
    "w13 dtype": (SPEC, lambda: _weights(w13=torch.randn(8, 32, 32))),
    "bias not in spec": (SPEC, lambda: _weights(b13=torch.randn(8, 32))),
    "bias missing": (SPEC.replace(has_bias=True), lambda: _weights()),
    "bias shape": (
        SPEC.replace(has_bias=True),
        lambda: _weights(b13=torch.randn(8, 31), b2=torch.randn(8, 32)),
    ),
    "ep local count": (SPEC.replace(ep_size=2, ep_rank=0), lambda: _weights()),
    "not ExpertWeights": (SPEC, lambda: {"w13": None}),
    "device": (SPEC, lambda: _weights(w2=torch.empty(8, 32, 16, dtype=torch.bfloat16, device="meta"))),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_bad_weights(spy_plan, case):
    spec, make = BAD_WEIGHTS[case]
    plan = moe_plan(spec, "cpu")
    with pytest.raises(MoEInputError):
        plan.prepare(make())
    assert CALLS == []


QUANT_BAD = {
    "fp8 missing scale": ("fp8", lambda w: setattr(w, "w13_scale", None)),
    "fp8 scale shape": ("fp8", lambda w: setattr(w, "w13_scale", torch.ones(8))),
    "fp8 scale dtype": ("fp8", lambda w: setattr(w, "w2_scale", w.w2_scale.half())),
    "fp8_block scale shape": ("fp8_block", lambda w: setattr(w, "w13_scale", torch.ones(8, 1, 2))),
    "mxfp4 packed shape": ("mxfp4", lambda w: setattr(w, "w13", torch.zeros(8, 64, 64, dtype=torch.uint8))),
    "mxfp4 scale dtype": ("mxfp4", lambda w: setattr(w, "w13_scale", w.w13_scale.float())),
    "nvfp4 no global": ("nvfp4", lambda w: setattr(w, "w2_global_scale", None)),
    "mixed precision": ("fp8", lambda w: setattr(w, "w2", torch.randn(8, 32, 16))),
}


@pytest.mark.parametrize("case", sorted(QUANT_BAD))
def test_bad_quantized_weights(case):
    scheme, corrupt = QUANT_BAD[case]
    spec = SPEC.replace(quant=scheme, hidden_size=64, intermediate_size=32)  # fp4 groups of 32
    weights = random_expert_weights(spec)
    moe_plan(spec, "cpu").prepare(weights)  # valid before the corruption
    corrupt(weights)
    with pytest.raises(MoEInputError):
        moe_plan(spec, "cpu").prepare(weights)


def test_static_activation_scale_required():
    spec = SPEC.replace(quant=moe_core.QuantScheme("fp8", activation="fp8_per_tensor"))
    weights = random_expert_weights(spec)
    weights.a2_scale = None
    with pytest.raises(MoEInputError, match="a2_scale"):
        moe_plan(spec, "cpu").prepare(weights)


def test_high_precision_weights_accepted_for_quantized_schemes():
    spec = SPEC.replace(quant="mxfp4", hidden_size=64, intermediate_size=32)
    weights = random_expert_weights(spec, quantize=False)
    assert weights.w13.dtype == torch.float32
    prepared = moe_plan(spec, "cpu").prepare(weights)
    assert prepared["w13"].dtype == torch.uint8 and prepared["w13"].shape == (8, 64, 32)
    assert isinstance(ExpertWeights(**prepared.tensors), ExpertWeights)


#: the cases whose error comes from a value check (not part of the fast path's decision)
VALUE_CASES = {"id out of range", "negative id"}


@pytest.mark.parametrize("case", sorted(set(BAD_APPLY) - VALUE_CASES))
def test_fast_check_refuses_every_bad_input(spy_plan, case, monkeypatch):
    """With value checks off (as on a GPU), the fast path of check_apply_inputs lets no bad input
    through: it answers False and the checks one by one raise."""
    from moe_core import planner

    monkeypatch.setattr(planner, "should_check_values", lambda t: False)
    plan, prepared = spy_plan
    x, w, ids = BAD_APPLY[case](*_good())
    assert not planner._plain_inputs(plan, x, prepared, w, ids, None)
    with pytest.raises(MoEInputError):
        moe_apply(plan, x, prepared, w, ids)
    assert CALLS == []


def test_fast_check_takes_good_inputs_only(spy_plan, monkeypatch):
    from moe_core import planner

    plan, prepared = spy_plan
    x, w, ids = _good()
    out = torch.empty_like(x)
    assert not planner._plain_inputs(plan, x, prepared, w, ids, out)  # CPU: ids values are checked
    monkeypatch.setattr(planner, "should_check_values", lambda t: False)
    assert planner._plain_inputs(plan, x, prepared, w, ids, out)
    assert planner._plain_inputs(plan, x, prepared, w, ids.long(), None)
    bad_outs = [torch.empty(4, 31, dtype=x.dtype), torch.empty(4, 32), torch.empty(32, 4, dtype=x.dtype).t()]
    for bad in [*bad_outs, "buffer", out.to("meta")]:
        assert not planner._plain_inputs(plan, x, prepared, w, ids, bad)
    other = type(prepared)("another.kernel", prepared.tensors)
    assert not planner._plain_inputs(plan, x, other, w, ids, out)
    assert not planner._plain_inputs(plan, x, prepared.tensors, w, ids, out)
    assert not planner._plain_inputs("plan", x, prepared, w, ids, out)
    moved = type(prepared)(prepared.kernel, {**prepared.tensors, "w2": prepared.tensors["w2"].to("meta")})
    assert not planner._plain_inputs(plan, x, moved, w, ids, out)
    # a passing check is remembered per version of the tensors: a replaced tensor is checked again
    assert planner._plain_inputs(plan, x, prepared, w, ids, out)
    good = prepared.tensors["w2"]
    prepared.tensors["w2"] = good.to("meta")
    assert not planner._plain_inputs(plan, x, prepared, w, ids, out)
    prepared.tensors["w2"] = good
    assert planner._plain_inputs(plan, x, prepared, w, ids, out)
    prepared.tensors = {**prepared.tensors, "w2": good.to("meta")}  # a plain dict: checked every call
    assert not planner._plain_inputs(plan, x, prepared, w, ids, out)
    prepared.tensors = planner.TensorDict(prepared.tensors, w2=good)
    moe_apply(plan, x, prepared, w, ids, out=out)
    assert CALLS == ["apply"]


def test_prepared_tensors_version_changes_with_every_change():
    from moe_core.planner import PreparedWeights, TensorDict

    t = torch.zeros(2)
    prepared = PreparedWeights("spy.torch.experts", {"a": t})
    tensors = prepared.tensors
    assert isinstance(tensors, TensorDict) and tensors == {"a": t}
    seen = {tensors.version}
    changes = [
        lambda d: d.__setitem__("b", t),
        lambda d: d.update(c=t),
        lambda d: d.__ior__({"d": t}),
        lambda d: d.setdefault("e", t),
        lambda d: d.pop("e"),
        lambda d: d.__delitem__("d"),
        lambda d: d.popitem(),
        lambda d: d.clear(),
    ]
    for change in changes:
        change(tensors)
        assert tensors.version not in seen
        seen.add(tensors.version)
    assert TensorDict().version not in seen  # unique across dicts too
    assert PreparedWeights("k", tensors).tensors is tensors
