"""nvidia.flashinfer.cutlass on an SM90 GPU with the prebuilt module (tools/device_nvidia.sh runs these)."""

from __future__ import annotations

import pytest
import torch

from moe_core import MoESpec, QuantScheme, moe_apply, moe_plan
from moe_core.bench import cold_routings
from moe_core.presets import get_preset
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, random_routing, relative_error, tolerance

from ..gpu_checks import no_host_sync, poison_allocator
from .helpers import HAS_FLASHINFER, HAS_GPU

KERNEL = "nvidia.flashinfer.cutlass"
FP8_PT = QuantScheme("fp8", activation="fp8_per_tensor", weight_scale="per_tensor")


def _sm90_with_module() -> str | None:
    if not HAS_GPU:
        return "needs a CUDA GPU"
    if not HAS_FLASHINFER:
        return "flashinfer-python not installed"
    if torch.cuda.get_device_capability()[0] != 9:
        return "needs SM90"
    from moe_plugin_nvidia._common import module_refusal

    return module_refusal("fused_moe_90", "bf16")


_REASON = _sm90_with_module()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _built(quant: str) -> bool:
    from moe_plugin_nvidia._common import module_refusal

    return module_refusal("fused_moe_90", quant) is None


def _plan(spec: MoESpec):
    """The cutlass plan; unforced where it is the planner's own choice (every scheme but fp8_block,
    ranked below the portable kernel, measured faster)."""
    from moe_plugin_nvidia.cutlass import SLOWER_THAN_PORTABLE

    return moe_plan(spec, "cuda", backend=KERNEL if spec.quant.name in SLOWER_THAN_PORTABLE else None)


def _run(spec: MoESpec, T: int, seed: int, ids: torch.Tensor | None = None, bound: float | None = None):
    plan = _plan(spec)
    assert plan.kernel == KERNEL, plan.explain()
    weights = random_expert_weights(spec, device="cuda", seed=seed)
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(T, spec.hidden_size, generator=gen, device="cuda").to(spec.dtype)
    topk_w = torch.rand(T, spec.top_k, generator=gen, device="cuda") + 0.05
    if ids is None:
        ids = (
            torch.rand(T, spec.num_experts, generator=gen, device="cuda")
            .argsort(dim=1)[:, : spec.top_k]
            .int()
        )
    prepared = plan.prepare(weights)
    poison_allocator()
    out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device="cuda")
    with no_host_sync():
        moe_apply(plan, x, prepared, topk_w, ids, out=out)
    torch.cuda.synchronize()
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    err = relative_error(out, want)
    limit = bound if bound is not None else tolerance(spec)
    assert err <= limit, f"relative error {err:.3e} > {limit:.1e} for {spec.describe()} T={T}"
    return plan, prepared, x, topk_w, ids, out


ODD = {"num_experts": 7, "top_k": 3, "hidden_size": 136, "intermediate_size": 72}
CASES = {
    "silu": {},
    "silu-fp16": {"dtype": torch.float16},
    "gelu": {"activation": "gelu"},
    "swiglu_oai-bias": {"activation": "swiglu_oai", "has_bias": True, "swiglu_limit": 1.5},
    "relu2": {"activation": "relu2"},
    "bias": {"has_bias": True},
    "k1": {"top_k": 1},
    "fp8": {"quant": FP8_PT, "hidden_size": 128, "intermediate_size": 64},
    "fp8_block": {"quant": "fp8_block", "hidden_size": 256, "intermediate_size": 128},
    "fp8_block-gelu": {
        "quant": "fp8_block",
        "hidden_size": 128,
        "intermediate_size": 256,
        "activation": "gelu",
    },
    # H and I padded to 128 by prepare (96 -> 128, 160 -> 256)
    "mxfp4": {"quant": "mxfp4", "hidden_size": 96, "intermediate_size": 160},
    "mxfp4-swiglu_oai-bias": {
        "quant": "mxfp4",
        "hidden_size": 256,
        "intermediate_size": 64,
        "activation": "swiglu_oai",
        "has_bias": True,
        "swiglu_limit": 1.5,
    },
}


@pytest.mark.parametrize("T", [1, 7, 33, 512])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(case, T):
    spec = MoESpec(**{**ODD, **CASES[case]})
    if not _built(spec.quant.name):
        pytest.skip(f"prebuilt fused_moe_90 has no {spec.quant.name}")
    _run(spec, T, seed=T)


@pytest.mark.parametrize("quant", ["bf16", "fp8_block", "mxfp4"])
@pytest.mark.parametrize("ep_rank", [0, 2])
def test_expert_parallel_skips_other_ranks_experts(ep_rank, quant):
    if not _built(quant):
        pytest.skip(f"prebuilt fused_moe_90 has no {quant}")
    spec = MoESpec(8, 2, 256, 128, ep_size=4, ep_rank=ep_rank, quant=quant)
    _run(spec, 33, seed=5)


def test_zero_tokens_launch_nothing():
    spec = MoESpec(**ODD)
    plan = moe_plan(spec, "cuda")
    prepared = plan.prepare(random_expert_weights(spec, device="cuda"))
    x = torch.empty(0, spec.hidden_size, device="cuda", dtype=spec.dtype)
    out = moe_apply(
        plan, x, prepared, torch.empty(0, 3, device="cuda"), torch.empty(0, 3, device="cuda").int()
    )
    assert out.shape == (0, spec.hidden_size)


def test_wrong_gate_up_order_would_be_caught():
    """Guards the [up; gate] swap: feeding canonical [gate; up] is far off the reference."""
    from moe_plugin_nvidia import cutlass

    spec = MoESpec(**ODD)
    plan, prepared, x, w, ids, out = _run(spec, 33, seed=9)
    prepared.tensors["fc1"] = cutlass._swap_halves(prepared.tensors["fc1"], 1)
    bad = moe_apply(plan, x, prepared, w, ids)
    assert relative_error(bad, out) > 0.3


@pytest.mark.parametrize(
    ("model", "quant", "T"),
    [
        ("mixtral-8x7b", None, 1),
        ("qwen3-30b-a3b", None, 512),
        ("gpt-oss-20b", None, 33),
        ("deepseek-v3-tp8", "fp8_block", 1),
        ("deepseek-v3-tp8", "fp8_block", 300),
        ("gpt-oss-120b", "mxfp4", 1),
        ("gpt-oss-120b", "mxfp4", 300),
    ],
)
def test_real_shapes(model, quant, T):
    if quant and not _built(quant):
        pytest.skip(f"prebuilt fused_moe_90 has no {quant}")
    preset = get_preset(model)
    spec = preset.moe_spec(torch.bfloat16, quant)
    w, ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
    plan = _plan(spec)
    assert plan.kernel == KERNEL, plan.explain()
    weights = random_expert_weights(spec, device="cuda", seed=1)
    prepared = plan.prepare(weights)
    x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
    with no_host_sync():
        out = moe_apply(plan, x, prepared, w, ids)
    torch.cuda.synchronize()
    want = fused_experts_reference(spec, x, weights, w, ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= tolerance(spec)


@pytest.mark.parametrize(
    ("model", "quant"), [("qwen3-30b-a3b", None), ("deepseek-v3-tp8", "fp8_block"), ("gpt-oss-120b", "mxfp4")]
)
def test_graph_replay_matches_eager(model, quant):
    """FlashInfer's fused finalize reduces with atomics: replay vs eager agree to rounding, not bitwise."""
    if quant and not _built(quant):
        pytest.skip(f"prebuilt fused_moe_90 has no {quant}")
    preset = get_preset(model)
    spec = preset.moe_spec(torch.bfloat16, quant)
    T = 8
    plan = _plan(spec)
    prepared = plan.prepare(random_expert_weights(spec, device="cuda"))
    x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
    w, ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=1)
    moe_apply(plan, x, prepared, w, ids)  # warm up (module load, workspace) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    static_out = torch.empty_like(x)
    with torch.cuda.graph(graph):
        moe_apply(plan, x, prepared, w, ids, out=static_out)
    x.copy_(torch.randn_like(x))
    new_w, new_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=2)
    w.copy_(new_w)
    ids.copy_(new_ids)
    static_out.fill_(float("nan"))
    graph.replay()
    eager = moe_apply(plan, x, prepared, w, ids)
    assert relative_error(static_out, eager) <= 1e-2


def test_tune_cache_is_used(tmp_path, monkeypatch):
    """moe tune's tactics land in the table; apply then passes them as profile_ids."""
    from moe_plugin_nvidia import cutlass, tuning

    monkeypatch.setenv("MOE_NVIDIA_TUNE_DIR", str(tmp_path))
    tuning.clear_cache()
    spec = MoESpec(8, 2, 256, 128)
    entry = tuning.tune_layer(spec, torch.device("cuda"), [4])
    searched = entry["searched"]["4"]
    assert searched["gemm1"]["count"] > 1 and searched["gemm2"]["count"] > 1, searched  # tactics enumerated
    assert searched["routings"] == cold_routings(spec, 4) > 1  # a tiny layer: timed over many routings
    name = torch.cuda.get_device_name()
    tuning.merge_table(tmp_path / tuning.table_name(name), name, "x", {tuning.layer_key(spec): entry})
    assert tuning.lookup(spec, name, 4) == entry["buckets"]["4"]
    seen = []

    def spying(fn):
        def spy(**kw):
            seen.append(kw["profile_ids"])
            return fn(**kw)

        return spy

    fn, act = cutlass._flashinfer()
    module_call = cutlass._module_call

    def spied_module_call(layer):
        found = module_call(layer)
        return None if found is None else (spying(found[0]), found[1])

    monkeypatch.setattr(cutlass, "_flashinfer", lambda: (spying(fn), act))
    monkeypatch.setattr(cutlass, "_module_call", spied_module_call)
    for value in ("1", "0"):  # the module entry (the default), then FlashInfer's public call
        monkeypatch.setenv("MOE_NVIDIA_MODULE_CALL", value)
        _run(spec, 4, seed=3)
    assert seen == [entry["buckets"]["4"]] * 2


@pytest.mark.parametrize("T", [1, 300])
def test_fp8_block_precompiled_gemm_without_deepgemm(monkeypatch, T):
    """TRTLLM_DG_ENABLED=0 (what the plugin sets without an nvcc): FlashInfer's precompiled block-scale GEMM."""
    if not _built("fp8_block"):
        pytest.skip("prebuilt fused_moe_90 has no fp8_block")
    monkeypatch.setenv("TRTLLM_DG_ENABLED", "0")
    _run(MoESpec(**{**ODD, **CASES["fp8_block"]}), T, seed=11)


@pytest.mark.parametrize("T", [1, 33])
@pytest.mark.parametrize("case", ["silu", "fp8", "mxfp4-swiglu_oai-bias"])
def test_module_call_matches_reference(monkeypatch, case, T):
    """MOE_NVIDIA_MODULE_CALL=1: the compiled module's entry, called without FlashInfer's wrapper."""
    from moe_plugin_nvidia import cutlass

    spec = MoESpec(**{**ODD, **CASES[case]})
    if not _built(spec.quant.name):
        pytest.skip(f"prebuilt fused_moe_90 has no {spec.quant.name}")
    monkeypatch.setenv("MOE_NVIDIA_MODULE_CALL", "1")
    _, prepared, *_ = _run(spec, T, seed=11 + T)
    module = prepared.cache[cutlass.KERNEL][1][4]
    assert module is not None and module[0] is not cutlass._flashinfer()[0]
