"""The reference experts against an independent float64 per-token computation."""

from __future__ import annotations

import math

import pytest
import torch

from moe_core import MoESpec, QuantScheme, moe_apply, moe_plan
from moe_core import quant as q
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, relative_error, tolerance


def _act(h: list[float], spec: MoESpec) -> list[float]:
    """The activations written out element by element (float64 math)."""
    inter = spec.intermediate_size
    if spec.activation == "relu2":
        return [max(v, 0.0) ** 2 for v in h]
    out = []
    for g, u in zip(h[:inter], h[inter:]):
        if spec.activation == "silu":
            out.append(g / (1 + math.exp(-g)) * u)
        elif spec.activation == "gelu":
            out.append(0.5 * g * (1 + math.erf(g / math.sqrt(2))) * u)
        else:
            g = min(g, spec.swiglu_limit)
            u = min(max(u, -spec.swiglu_limit), spec.swiglu_limit)
            out.append(g / (1 + math.exp(-spec.swiglu_alpha * g)) * (u + 1))
    return out


def oracle(spec, x, weights, topk_w, topk_ids):
    """Token by token, slot by slot, in float64, from the canonical definition."""
    deq = q.dequantize_weights(weights, spec.quant) if spec.quant.is_quantized else weights
    w13, w2 = deq.w13.double(), deq.w2.double()
    g2l = spec.global_to_local()
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float64)
    for t in range(T):
        for j in range(topk_ids.shape[1]):
            e = g2l[int(topk_ids[t, j])]
            if e < 0:
                continue
            route = float(topk_w[t, j])
            xin = x[t].double() * (route if spec.apply_router_weight_on_input else 1.0)
            xin = q.fake_quantize_activation(xin[None], spec.quant, weights.a13_scale)[0].double()
            h = w13[e] @ xin
            if weights.b13 is not None:
                h = h + weights.b13[e].double()
            a = torch.tensor(_act(h.tolist(), spec), dtype=torch.float64)
            a = q.fake_quantize_activation(a[None], spec.quant, weights.a2_scale)[0].double()
            o = w2[e] @ a
            if weights.b2 is not None:
                o = o + weights.b2[e].double()
            out[t] += o * (1.0 if spec.apply_router_weight_on_input else route)
    return out


def _inputs(spec: MoESpec, T: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    # rows spanning several binades
    x = (
        torch.randn(T, spec.hidden_size, generator=gen) * 2.0 ** torch.randint(-3, 4, (T, 1), generator=gen)
    ).to(spec.dtype)
    topk_w = torch.rand(T, spec.top_k, generator=gen) + 0.1
    topk_ids = torch.rand(T, spec.num_experts, generator=gen).argsort(dim=1)[:, : spec.top_k].int()
    return x, topk_w, topk_ids


BASE = {"num_experts": 6, "top_k": 2, "hidden_size": 40, "intermediate_size": 24}
FP4 = {"hidden_size": 64, "intermediate_size": 96}
CASES = {
    "silu": {},
    "gelu": {"activation": "gelu"},
    "swiglu_oai+bias": {"activation": "swiglu_oai", "has_bias": True},
    "relu2": {"activation": "relu2"},
    "fp16": {"dtype": torch.float16},
    "fp32": {"dtype": torch.float32, "has_bias": True},
    "ep_size": {"ep_size": 4, "ep_rank": 1},
    "expert_map": {"expert_map": (-1, 2, -1, 0, 1, -1)},
    "weight_on_input": {"top_k": 1, "apply_router_weight_on_input": True},
    "fp8_channel": {"quant": "fp8"},
    "fp8_tensor": {"quant": QuantScheme("fp8", weight_scale="per_tensor")},
    "fp8_static": {"quant": QuantScheme("fp8", activation="fp8_per_tensor"), "has_bias": True},
    "fp8_block": {"quant": "fp8_block", "hidden_size": 200, "intermediate_size": 136},
    "mxfp4": {"quant": "mxfp4", "activation": "swiglu_oai", "has_bias": True, **FP4},
    "mxfp4_w4a8": {"quant": QuantScheme("mxfp4", activation="fp8_per_tensor"), **FP4},
    "nvfp4": {"quant": "nvfp4", **FP4},
    "nvfp4_w4a16": {"quant": QuantScheme("nvfp4", activation="none"), "ep_size": 2, "ep_rank": 1, **FP4},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("T", [0, 1, 7, 33])
def test_reference_matches_oracle(case, T):
    spec = MoESpec(**{**BASE, **CASES[case]})
    weights = random_expert_weights(spec, seed=T)
    if spec.quant.activation == "nvfp4":  # static global scales make per-token oracle and reference agree
        weights.a13_scale = torch.tensor(8.0 / (448 * 6))
        weights.a2_scale = torch.tensor(8.0 / (448 * 6))
    x, topk_w, topk_ids = _inputs(spec, T, seed=T + 1)
    want = oracle(spec, x, weights, topk_w, topk_ids)
    got64 = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert got64.shape == (T, spec.hidden_size) and got64.dtype == torch.float64
    assert relative_error(got64, want) < 1e-12
    got32 = fused_experts_reference(spec, x, weights, topk_w, topk_ids)
    assert got32.dtype == torch.float32
    # float32 math may move a quantized activation to a neighbouring code
    assert relative_error(got32, want) < (1e-5 if spec.quant.activation == "none" else 2e-2)
    if T:
        assert want.abs().sum() > 0  # never compare zeros
    plan = moe_plan(spec, "cpu")
    out = moe_apply(plan, x, plan.prepare(weights), topk_w, topk_ids)
    assert out.dtype == spec.dtype and relative_error(out, want) <= tolerance(spec)


def test_non_local_experts_contribute_nothing():
    spec = MoESpec(**{**BASE, "expert_map": (-1, 0, -1, -1, -1, -1)})
    weights = random_expert_weights(spec)
    x, topk_w, _ = _inputs(spec, 5, seed=3)
    ids = torch.tensor([[0, 2]] * 5, dtype=torch.int32)  # no local expert at all
    assert torch.count_nonzero(fused_experts_reference(spec, x, weights, topk_w, ids)) == 0
    ids = torch.tensor([[1, 2]] * 5, dtype=torch.int32)
    assert torch.count_nonzero(fused_experts_reference(spec, x, weights, topk_w, ids)) > 0


def test_high_precision_weights_are_quantized_like_kernels_do():
    spec = MoESpec(**{**BASE, "quant": "fp8_block"})
    hp = random_expert_weights(spec, quantize=False)
    x, topk_w, topk_ids = _inputs(spec, 9, seed=5)
    plan = moe_plan(spec, "cpu")
    from_hp = moe_apply(plan, x, plan.prepare(hp), topk_w, topk_ids)
    from_q = moe_apply(plan, x, plan.prepare(q.quantize_weights(hp, spec.quant)), topk_w, topk_ids)
    assert torch.equal(from_hp, from_q)
