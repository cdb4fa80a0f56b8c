"""portable.triton.fused_moe against the float64 reference (CPU interpreter and GPU)."""

from __future__ import annotations

import json

import pytest
import torch

import moe_core
from moe_core import DeviceInfo, MoESpec, QuantScheme, moe_apply, moe_plan
from moe_core.presets import get_preset
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, random_routing, relative_error, tolerance
from moe_plugin_portable import configs

from ..gpu_checks import no_host_sync
from .helpers import DEVICE, assert_graph_replay_matches_eager, gpu, needs_triton

KERNEL = "portable.triton.fused_moe"


def _check(spec: MoESpec, T: int, seed: int, device: str = DEVICE, ids: torch.Tensor | None = None):
    plan = moe_plan(spec, device)
    assert plan.kernel == KERNEL, plan.explain()
    weights = random_expert_weights(spec, device=device, seed=seed)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = (torch.randn(T, spec.hidden_size, generator=gen, device=device) * 1.5).to(spec.dtype)
    topk_w = torch.rand(T, spec.top_k, generator=gen, device=device) + 0.05
    if ids is None:
        ids = (
            torch.rand(T, spec.num_experts, generator=gen, device=device)
            .argsort(dim=1)[:, : spec.top_k]
            .int()
        )
    prepared = plan.prepare(weights)
    out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device=device)
    moe_apply(plan, x, prepared, topk_w, ids, out=out)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    err = relative_error(out, want)
    assert err <= tolerance(spec), f"relative error {err:.3e} > {tolerance(spec):.1e} for {spec.describe()}"
    return plan, prepared, x, topk_w, ids, out


BASE = {"num_experts": 7, "top_k": 3, "hidden_size": 72, "intermediate_size": 40}
CASES = {
    "silu": {},
    "gelu-fp16": {"activation": "gelu", "dtype": torch.float16},
    "swiglu_oai-bias": {"activation": "swiglu_oai", "has_bias": True, "swiglu_limit": 1.5},
    "relu2-bias": {"activation": "relu2", "has_bias": True},
    "even-k": {"hidden_size": 128, "intermediate_size": 64},
    "ep": {"ep_size": 3, "ep_rank": 2},
    "expert_map": {"expert_map": (2, -1, 0, -1, 1, -1, -1)},
    "k1-direct": {"top_k": 1},
    "weight-on-input": {"top_k": 1, "apply_router_weight_on_input": True, "has_bias": True},
    "k1-ep": {"top_k": 1, "ep_size": 2, "ep_rank": 0},
}


@needs_triton
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("T", [1, 7, 33])
def test_matches_reference(case, T):
    _check(MoESpec(**{**BASE, **CASES[case]}), T, seed=T)


@needs_triton
def test_empty_batch_and_skewed_load():
    spec = MoESpec(**BASE)
    plan = moe_plan(spec, DEVICE)
    prepared = plan.prepare(random_expert_weights(spec, device=DEVICE))
    empty = moe_apply(
        plan,
        torch.empty(0, 72, dtype=spec.dtype, device=DEVICE),
        prepared,
        torch.empty(0, 3, device=DEVICE),
        torch.empty(0, 3, dtype=torch.int32, device=DEVICE),
    )
    assert empty.shape == (0, 72)
    # every token on the same three experts: one expert spans several blocks
    ids = torch.tensor([[4, 0, 6]] * 40, dtype=torch.int64, device=DEVICE)
    _check(spec, 40, seed=3, ids=ids)


def test_supports_refuses_precisely():
    nvfp4 = MoESpec(**{**BASE, "hidden_size": 64, "intermediate_size": 48}, quant="nvfp4")
    plan = moe_plan(nvfp4, DeviceInfo.parse("sm_90"))
    assert "quant nvfp4 not supported" in plan.explain() and plan.kernel != KERNEL
    mixed = MoESpec(**BASE, quant=QuantScheme("bf16"), dtype=torch.float16)
    text = moe_plan(mixed, DeviceInfo.parse("sm_90")).explain()
    assert "must share a dtype" in text
    assert moe_plan(MoESpec(**BASE), DeviceInfo.parse("gfx950")).kernel == KERNEL


def test_heuristic_follows_tokens_per_expert():
    spec = get_preset("qwen3-30b-a3b").moe_spec()
    decode = configs.heuristic_config(spec, 1, 132, False)
    prefill = configs.heuristic_config(spec, 8192, 132, False)
    assert decode.block_m == 16 and prefill.block_m == 128
    # decode at T=1 touches 8 experts: block_n shrinks so both GEMMs launch ~2 programs per SM
    assert 8 * -(-spec.intermediate_size // decode.gemm1.block_n) >= 132 or decode.gemm1.block_n == 16
    assert configs.heuristic_config(spec, 8192, 304, True).block_m == 64  # AMD: smaller tiles
    assert [configs.t_bucket(t) for t in (1, 2, 8, 9, 2048, 2049, 10**6)] == [
        "1",
        "8",
        "8",
        "32",
        "2048",
        "inf",
        "inf",
    ]


def test_config_table_round_trip(tmp_path, monkeypatch):
    spec = get_preset("tiny-mixtral").moe_spec()
    cfg = configs.heuristic_config(spec, 64, 132, False)
    table = {"device": "Fake GPU", "configs": {configs.layer_key(spec): {"128": cfg.to_json()}}}
    (tmp_path / configs.config_file_name("Fake GPU 80GB")).write_text(json.dumps(table))
    monkeypatch.setenv("MOE_PORTABLE_CONFIG_DIR", str(tmp_path))
    configs._load_table.cache_clear()
    loaded = configs._load_table("Fake GPU 80GB")
    assert configs.MoEConfig.from_json(loaded[configs.layer_key(spec)]["128"]) == cfg
    assert configs.config_file_name("NVIDIA H100 80GB HBM3") == "NVIDIA_H100_80GB_HBM3.json"
    configs._load_table.cache_clear()


@pytest.mark.parametrize("path", sorted(configs._PACKAGE_DIR.glob("*.json")), ids=lambda p: p.name)
def test_shipped_tables_parse(path):
    """Every entry of a shipped table is a bucket label of ``T_BUCKETS`` and parses (unknown GEMM
    fields would raise); a decode entry chains only on what the chained launch runs (the GEMV
    kernels, nothing pre-quantized), else the chain flag would be silently ignored."""
    table = json.loads(path.read_text())
    labels = {configs.t_bucket(int(b)) if b != float("inf") else "inf" for b in configs.T_BUCKETS}
    assert table["configs"] and table["device"]
    for key, buckets in table["configs"].items():
        assert set(buckets) <= labels, key
        for bucket, entry in buckets.items():
            configs.MoEConfig.from_json(entry)
            if "decode" in entry and "gemm1" in entry["decode"]:
                decode = configs.DecodeConfig.from_json(entry["decode"])
                if decode.chain:
                    assert decode.chained(decode.prefetch) == decode, (key, bucket)


GPU_CASES = [
    ("qwen3-30b-a3b", torch.bfloat16, None),
    ("deepseek-v3-tp8", torch.bfloat16, None),
    ("gpt-oss-20b", torch.bfloat16, None),
    ("mixtral-8x7b", torch.float16, None),
    ("llama-4-scout", torch.bfloat16, None),
    ("qwen3-30b-a3b", torch.bfloat16, 4),  # expert parallel, rank 1 of 4
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("model", "dtype", "ep"), GPU_CASES)
@pytest.mark.parametrize("T", [1, 8, 129, 2048])
def test_gpu_real_shapes(model, dtype, ep, T):
    preset = get_preset(model)
    spec = preset.moe_spec(dtype, ep_size=ep or 1, ep_rank=1 if ep else 0)
    plan = moe_plan(spec, "cuda")
    assert plan.kernel == KERNEL, plan.explain()
    weights = random_expert_weights(spec, device="cuda", seed=T)
    prepared = plan.prepare(weights)
    x = torch.randn(T, spec.hidden_size, device="cuda").to(dtype)
    topk_w, topk_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
    out = torch.full((T, spec.hidden_size), float("nan"), dtype=dtype, device="cuda")
    with no_host_sync():
        moe_apply(plan, x, prepared, topk_w, topk_ids, out=out)
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= tolerance(spec)

    # CUDA graph: capture once, replay on new inputs copied into the static buffers
    assert_graph_replay_matches_eager(plan, prepared, preset, x, topk_w, topk_ids, seed=T + 100)


@gpu
@pytest.mark.gpu
def test_gpu_planner_picks_portable():
    spec = get_preset("qwen3-30b-a3b").moe_spec(torch.bfloat16)
    assert moe_core.moe_plan(spec, "cuda").kernel == KERNEL


@needs_triton
def test_tuner_writes_a_table_the_runtime_reads(tmp_path):
    from moe_plugin_portable import tuning

    spec = MoESpec(**BASE)
    found = tuning.tune_layer(spec, DEVICE, tokens=(3, 40), space="small")
    assert set(found) == {"8", "128"}
    for entry in found.values():
        cfg = configs.MoEConfig.from_json(entry)
        assert cfg.gemm1 in tuning.gemm_space(cfg.block_m, 2, "small")[0]
        assert entry["timing"]["total_us"] > 0
    path = tuning.write_table("Fake GPU", {configs.layer_key(spec): found}, tmp_path, "3.x")
    table = json.loads(path.read_text())
    assert table["configs"][configs.layer_key(spec)]["8"]["block_m"] == found["8"]["block_m"]
    # the chosen config computes the right result
    cfg = configs.MoEConfig.from_json(found["128"])
    plan = moe_plan(spec, DEVICE)
    weights = random_expert_weights(spec, device=DEVICE)
    x = torch.randn(40, spec.hidden_size, device=DEVICE).to(spec.dtype)
    w, ids = random_routing(moe_core.RoutingSpec("softmax", 3), 40, 7, device=DEVICE)
    from moe_plugin_portable.experts import fused_moe

    out = torch.full_like(x, float("nan"))
    fused_moe(spec, x, plan.prepare(weights).tensors, w, ids, out, config=cfg)
    want = fused_experts_reference(spec, x, weights, w, ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= tolerance(spec)
