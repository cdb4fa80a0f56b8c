"""nvidia.flashinfer.cutlass on the CPU: refusals on faked devices, prepare transforms, the FlashInfer call."""

from __future__ import annotations

import contextlib
import inspect
import re
import types

import pytest
import torch

from moe_core import DeviceInfo, MoESpec, QuantScheme, moe_plan
from moe_core.errors import UnsupportedError
from moe_core.testing import random_expert_weights
from moe_plugin_nvidia import cutlass
from moe_plugin_nvidia.cutlass import KERNEL, flashinfer_kwargs, prepare, supports, to_canonical

from .helpers import fake_install, needs_flashinfer

SM90 = DeviceInfo.parse("sm_90")
SM100 = DeviceInfo.parse("sm_100")
BASE = {"num_experts": 8, "top_k": 2, "hidden_size": 64, "intermediate_size": 48}
FP8_PT = QuantScheme("fp8", activation="fp8_per_tensor", weight_scale="per_tensor")
BLOCK = {"quant": "fp8_block", "hidden_size": 256, "intermediate_size": 128}
MX = {"quant": "mxfp4", "hidden_size": 96, "intermediate_size": 160}  # both padded to 128 / 256


def _spec(**kw) -> MoESpec:
    return MoESpec(**{**BASE, **kw})


def test_planner_picks_cutlass_on_sm90_when_built(monkeypatch):
    fake_install(monkeypatch, quants=["bf16"])
    plan = moe_plan(_spec(), SM90)
    assert plan.kernel == KERNEL, plan.explain()
    text = plan.explain()
    assert "nvidia.flashinfer.trtllm" in text and "nvidia.flashinfer.cute_dsl" in text
    assert text.count("cuda>=10.0,<11.0") == 2  # both SM100 kernels refused by capability on sm_90


def test_fp8_block_ranks_below_the_faster_portable_kernel(monkeypatch):
    fake_install(monkeypatch)
    assert cutlass.rank(_spec(), SM90) == 70 and cutlass.rank(_spec(**BLOCK), SM90) == 40
    plan = moe_plan(_spec(**BLOCK), SM90)
    assert plan.kernel == "portable.triton.fused_moe", plan.explain()
    assert re.search(r"nvidia\.flashinfer\.cutlass +p=40 +usable, lower priority", plan.explain())
    assert moe_plan(_spec(**BLOCK), SM90, backend=KERNEL).kernel == KERNEL


@pytest.mark.parametrize(
    ("install", "kw", "device", "needle"),
    [
        ({"version": None}, {}, SM90, "flashinfer-python is not installed"),
        ({"version": "0.6.9"}, {}, SM90, "too old (need >= 0.7.2)"),
        ({"built": False}, {}, SM90, "moe nvidia build --arch 9.0a --quant bf16"),
        ({"quants": ["bf16"]}, {"quant": FP8_PT}, SM90, "has no fp8 kernels (built: bf16)"),
        ({"quants": ["bf16"]}, {"dtype": torch.float16}, SM90, "has no fp16 kernels"),
        ({}, {"dtype": torch.float32}, SM90, "bf16 or fp16"),
        ({}, {"quant": "fp8"}, SM90, "per-tensor weight scales and static per-tensor activation"),
        ({"quants": ["bf16"]}, BLOCK, SM90, "has no fp8_block kernels (built: bf16)"),
        ({}, {**BLOCK, "dtype": torch.float16}, SM90, "takes bf16 activations"),
        ({"built": False}, BLOCK, SM100, "SM90 only"),
        ({}, {**BLOCK, "intermediate_size": 192}, SM90, "multiples of 128 (DeepGEMM 128x128 blocks)"),
        ({}, {**BLOCK, "has_bias": True}, SM90, "biases is not wired"),
        ({}, {**BLOCK, "activation": "swiglu_oai"}, SM90, "activation swiglu_oai not wired"),
        ({}, {**BLOCK, "quant": QuantScheme("fp8_block", block_shape=(64, 128))}, SM90, "128x128"),
        ({"quants": ["bf16", "fp8"]}, MX, SM90, "has no mxfp4 kernels"),
        ({}, {**MX, "quant": QuantScheme("mxfp4", activation="fp8_per_tensor")}, SM90, "W4A8"),
        ({}, {**MX, "activation": "gelu"}, SM90, "activation gelu not wired"),
        ({}, {**MX, "dtype": torch.float16}, SM90, "takes bf16 activations"),
        ({}, {"hidden_size": 60}, SM90, "multiples of 8"),
        ({}, {"quant": FP8_PT, "intermediate_size": 40}, SM90, "multiples of 16"),
        ({}, {"ep_size": 3}, SM90, "equal slices"),
        ({}, {"expert_map": (0, -1, 1, -1, -1, -1, -1, -1)}, SM90, "contiguous slice"),
        ({}, {"quant": FP8_PT, "has_bias": True}, SM90, "fp8 with biases"),
        ({"built": False}, {}, SM100, "fused_moe_100 is not built"),
        ({}, {}, DeviceInfo.parse("cpu"), "needs an NVIDIA GPU"),
    ],
)
def test_supports_refuses_precisely(monkeypatch, install, kw, device, needle):
    fake_install(monkeypatch, **install)
    reason = supports(_spec(**kw), device)
    assert reason is not None and needle in reason, reason


def test_supports_accepts(monkeypatch):
    fake_install(monkeypatch)  # FlashInfer's full build (no manifest): every scheme
    for kw in (
        {},
        {"dtype": torch.float16},
        {"activation": "gelu"},
        {"activation": "relu2", "has_bias": True},
        {"activation": "swiglu_oai", "has_bias": True},
        {"quant": FP8_PT},
        {"ep_size": 4, "ep_rank": 3},
        {"expert_map": (-1, -1, -1, -1, 0, 1, 2, 3)},
        BLOCK,
        {**BLOCK, "activation": "gelu", "ep_size": 2, "ep_rank": 1},
        MX,
        {**MX, "activation": "swiglu_oai", "has_bias": True},
    ):
        assert supports(_spec(**kw), SM90) is None, kw


def test_allow_jit_accepts_a_missing_module(monkeypatch):
    fake_install(monkeypatch, built=False)
    monkeypatch.setenv("MOE_NVIDIA_ALLOW_JIT", "1")
    assert supports(_spec(), SM90) is None


def test_router_weight_on_input_is_refused_by_declared_features(monkeypatch):
    fake_install(monkeypatch)
    plan = moe_plan(_spec(top_k=1, apply_router_weight_on_input=True), SM90)
    line = next(ln for ln in plan.explain().splitlines() if KERNEL in ln)
    assert "router_weight_on_input not supported" in line


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"dtype": torch.float16, "activation": "gelu"},
        {"activation": "swiglu_oai", "has_bias": True, "swiglu_limit": 3.0},
        {"activation": "relu2", "has_bias": True},
        {"ep_size": 4, "ep_rank": 2},
    ],
)
def test_prepare_swaps_gate_and_up_and_round_trips(kw):
    spec = _spec(**kw)
    w = random_expert_weights(spec, seed=3)
    p = prepare(spec, w, SM90)
    E, H, inter = spec.num_local_experts, spec.hidden_size, spec.intermediate_size
    fc1 = p.tensors["fc1"]
    assert fc1.shape == (E, spec.w13_rows, H) and fc1.dtype == spec.dtype and fc1.is_contiguous()
    assert p.tensors["fc2"].shape == (E, H, inter)
    if spec.is_gated:  # FlashInfer: up rows first, then gate
        assert torch.equal(fc1[:, :inter], w.w13[:, inter:]) and torch.equal(fc1[:, inter:], w.w13[:, :inter])
    else:
        assert torch.equal(fc1, w.w13)
    if spec.has_bias:
        assert p.tensors["fc1_bias"].shape == (E, spec.w13_rows) and p.tensors["fc2_bias"].dtype == spec.dtype
    if spec.activation == "swiglu_oai":
        assert torch.equal(p.tensors["swiglu_limit"], torch.full((E,), 3.0))
        assert torch.equal(p.tensors["swiglu_beta"], torch.ones(E))
        assert p.tensors["swiglu_alpha"].dtype == torch.float32
    assert p.meta["ep_size"] == spec.ep_size and p.meta["ep_rank"] == spec.ep_rank
    assert p.meta["activation"] == cutlass.ACTIVATION_TYPES[spec.activation]
    back = to_canonical(spec, p)
    for name, t in w.tensors().items():
        assert torch.equal(getattr(back, name), t), name


def test_prepare_fp8_quantizes_and_folds_scales():
    spec = _spec(quant=FP8_PT)
    high = random_expert_weights(spec, seed=5, quantize=False)
    p = prepare(spec, high, SM90)
    t = p.tensors
    assert t["fc1"].dtype == torch.float8_e4m3fn and t["fc2"].dtype == torch.float8_e4m3fn
    E = spec.num_experts
    assert t["fc1_dequant"].shape == (E,) and t["fc2_dequant"].shape == (E,)
    assert t["fc2_quant"].dim() == 0 and t["fc1_input_scale"].dim() == 0
    torch.testing.assert_close(t["fc1_dequant"], t["w13_scale"] * high.a13_scale)
    torch.testing.assert_close(t["fc2_quant"] * high.a2_scale, torch.tensor(1.0))
    quantized = random_expert_weights(spec, seed=5)  # the reference quantizer, same data
    back = to_canonical(spec, p)
    assert torch.equal(back.w13.view(torch.uint8), quantized.w13.view(torch.uint8))
    torch.testing.assert_close(back.w2_scale, quantized.w2_scale)
    torch.testing.assert_close(back.a2_scale, quantized.a2_scale.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp8_kernel_input_is_the_static_quantization(dtype):
    """fp8's input: e4m3 of ``x / a13_scale`` in float32, saturated at +-448, as the reference's;
    a replaced scale tensor is seen."""
    from moe_core.quant import quantize_fp8_per_tensor

    spec = _spec(quant=FP8_PT, dtype=dtype)
    p = prepare(spec, random_expert_weights(spec, seed=6), SM90)
    x = (torch.randn(9, spec.hidden_size, generator=torch.Generator().manual_seed(1)) * 300).to(dtype)
    for scale in (p.tensors["fc1_input_scale"], torch.tensor(0.37)):
        p.tensors["fc1_input_scale"] = scale
        got = cutlass.kernel_input(spec, x, p)
        want = (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        assert got.dtype == torch.float8_e4m3fn and got.shape == x.shape
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8))
        assert got.float().abs().max() == 448.0  # (x spans beyond the range: saturated, no NaN)
    ref = quantize_fp8_per_tensor(x, torch.tensor(0.37))  # the reference quantizer
    assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


def test_prepare_fp8_block_swaps_gate_and_up_blocks_with_their_scales():
    spec = _spec(**BLOCK)
    high = random_expert_weights(spec, seed=6, quantize=False)
    p = prepare(spec, high, SM90)
    t = p.tensors
    E, H, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
    assert t["fc1"].dtype == torch.float8_e4m3fn and t["fc1"].shape == (E, 2 * inter, H)
    assert t["fc1_block_scale"].shape == (E, 2 * inter // 128, H // 128)
    assert t["fc2_block_scale"].shape == (E, H // 128, inter // 128)
    assert t["fc1_block_scale"].dtype == torch.float32 and t["fc1_block_scale"].is_contiguous()
    quantized = random_expert_weights(spec, seed=6)  # the reference quantizer, same data
    nb = inter // 128
    assert torch.equal(t["fc1_block_scale"][:, :nb], quantized.w13_scale[:, nb:].float())  # up blocks first
    back = to_canonical(spec, p)
    assert torch.equal(back.w13.view(torch.uint8), quantized.w13.view(torch.uint8))
    assert torch.equal(back.w13_scale, quantized.w13_scale.float())
    assert torch.equal(back.w2_scale, quantized.w2_scale.float())


@pytest.mark.parametrize("kw", [MX, {**MX, "activation": "swiglu_oai", "has_bias": True, "ep_size": 2}])
def test_prepare_mxfp4_pads_to_128_and_round_trips(kw):
    spec = _spec(**kw)
    w = random_expert_weights(spec, seed=8)
    p = prepare(spec, w, SM90)
    t = p.tensors
    E, H, inter = spec.num_local_experts, spec.hidden_size, spec.intermediate_size
    Hp, Ip = 128, 256
    assert not p.meta["interleaved"]  # CPU tensors: FlashInfer's interleave runs on CUDA only
    assert t["fc1"].shape == (E, 2 * Ip, Hp // 2) and t["fc1"].dtype == torch.uint8
    assert t["fc1_scale"].shape == (E, 2 * Ip, Hp // 32) and t["fc2_scale"].shape == (E, Hp, Ip // 32)
    assert t["fc2"].shape == (E, Hp, Ip // 2)
    # up rows first; padding: zero codes (exact zeros whatever the scale), scale 2**0
    assert torch.equal(t["fc1"][:, :inter, : H // 2], w.w13[:, inter:])
    assert (
        not t["fc1"][:, inter:Ip].any() and not t["fc1"][:, :, H // 2 :].any() and not t["fc2"][:, H:].any()
    )
    assert (t["fc1_scale"][:, inter:Ip] == 127).all()
    if spec.has_bias:
        assert t["fc1_bias"].shape == (E, 2 * Ip) and t["fc2_bias"].shape == (E, Hp)
        assert not t["fc1_bias"][:, inter:Ip].any() and not t["fc2_bias"][:, H:].any()
        assert torch.equal(t["fc1_bias"][:, :inter], w.b13[:, inter:].to(spec.dtype))
    back = to_canonical(spec, p)
    for name, ref in w.tensors().items():
        ref = ref.to(spec.dtype) if name in ("b13", "b2") else ref  # biases are kept in bf16
        assert torch.equal(getattr(back, name), ref), name
    high = random_expert_weights(spec, seed=8, quantize=False)  # quantized by prepare: the same codes
    assert torch.equal(prepare(spec, high, SM90).tensors["fc1"], t["fc1"])


def test_mxfp4_input_is_padded_and_output_copied_back(monkeypatch):
    seen = {}

    def fake(**kw):
        seen.update(kw)
        kw["output"].fill_(2.0)

    monkeypatch.setattr(cutlass, "_flashinfer", lambda: (fake, None))
    monkeypatch.setattr(cutlass, "_ACT", {v: v for v in cutlass.ACTIVATION_TYPES.values()})
    spec = _spec(**MX)
    p, x, tw, ids, out = _call(spec, T=3)
    cutlass.apply(spec, x, p, tw, ids, out.fill_(float("nan")))
    assert seen["input"].shape == (3, 128) and torch.equal(seen["input"][:, :96], x)
    assert not seen["input"][:, 96:].any()
    assert seen["output"].shape == (3, 128) and torch.equal(out, torch.full_like(out, 2.0))
    assert seen["use_w4_group_scaling"] is True and seen["use_deepseek_fp8_block_scale"] is False
    assert [s.data_ptr() for s in seen["quant_scales"]] == [
        p.tensors[k].data_ptr() for k in ("fc1_scale", "fc2_scale")
    ]


def test_fp8_block_runs_its_one_tactic_without_the_tune_cache(monkeypatch, recwarn):
    seen = {}
    monkeypatch.setattr(cutlass, "_flashinfer", lambda: (lambda **kw: seen.update(kw), None))
    monkeypatch.setattr(cutlass, "_ACT", {v: v for v in cutlass.ACTIVATION_TYPES.values()})
    spec = _spec(**BLOCK)
    p, x, tw, ids, out = _call(spec, T=4)
    p.meta["device_name"] = "NVIDIA H200"
    cutlass.apply(spec, x, p, tw, ids, out)
    assert not [w for w in recwarn if "moe tune" in str(w.message)]
    assert seen["profile_ids"] == cutlass.FIXED_TACTICS and seen["input"] is x and seen["output"] is out
    assert seen["use_deepseek_fp8_block_scale"] is True and seen["use_w4_group_scaling"] is False
    assert seen["quant_scales"] == [p.tensors["fc1_block_scale"], p.tensors["fc2_block_scale"]]


def test_prepare_refuses_uneven_ep():
    spec = _spec(ep_size=3, ep_rank=0)
    with pytest.raises(UnsupportedError, match="equal slices"):
        prepare(spec, random_expert_weights(spec), SM90)


def _call(spec, T=5):
    w = random_expert_weights(spec, seed=1)
    p = prepare(spec, w, SM90)
    x = torch.randn(T, spec.hidden_size).to(spec.dtype)
    tw = torch.rand(T, spec.top_k)
    ids = torch.randint(0, spec.num_experts, (T, spec.top_k))
    out = torch.empty(T, spec.hidden_size, dtype=spec.dtype)
    return p, x, tw, ids, out


@needs_flashinfer
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"activation": "swiglu_oai", "has_bias": True},
        {"quant": FP8_PT},
        {"ep_size": 2, "ep_rank": 1},
        BLOCK,
        {**MX, "activation": "swiglu_oai", "has_bias": True},
    ],
)
def test_kwargs_bind_to_flashinfer_signature(kw):
    from flashinfer.fused_moe import ActivationType, cutlass_fused_moe

    spec = _spec(**kw)
    p, x, tw, ids, out = _call(spec)
    act = ActivationType(p.meta["activation"])
    kwargs = flashinfer_kwargs(spec, x, p, tw, ids, out, act, [3, 7])
    bound = inspect.signature(cutlass_fused_moe).bind(**kwargs)
    assert bound.arguments["token_selected_experts"].dtype == torch.int32
    assert bound.arguments["token_final_scales"].dtype == torch.float32
    assert bound.arguments["activation_type"] == act
    assert act.name == {"silu": "Swiglu", "swiglu_oai": "SwigluBias"}[spec.activation]
    tactics = cutlass.FIXED_TACTICS if spec.quant.name == "fp8_block" else [3, 7]
    assert bound.arguments["output"] is out and bound.arguments["profile_ids"] == tactics
    assert bound.arguments["use_deepseek_fp8_block_scale"] == (spec.quant.name == "fp8_block")
    assert bound.arguments["use_w4_group_scaling"] == (spec.quant.name == "mxfp4")


@needs_flashinfer
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"activation": "gelu", "dtype": torch.float16},
        {"quant": FP8_PT},
        {"activation": "relu2"},
        {"ep_size": 4, "ep_rank": 1, "has_bias": True},
        BLOCK,
        {**MX, "hidden_size": 128, "activation": "swiglu_oai", "has_bias": True},
    ],
)
def test_recorded_call_through_flashinfers_wrapper(monkeypatch, kw):
    """Run FlashInfer's real Python wrapper on CPU tensors with a recording module: the positional
    call it makes into its compiled module carries our tensors in the slots the binding reads."""
    import flashinfer.fused_moe.core as core
    from flashinfer.fused_moe import ActivationType, cutlass_fused_moe

    calls = []

    class Module:
        def cutlass_fused_moe(self, *args, **kwargs):
            calls.append((args, kwargs))
            return [args[0]]

    monkeypatch.setattr(core, "get_compute_capability", lambda device: (9, 0))
    monkeypatch.setattr(core, "get_cutlass_fused_moe_module", lambda arch: Module())
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(core, "is_cuda_version_at_least", lambda v: True, raising=False)
    spec = _spec(**kw)
    p, x, tw, ids, out = _call(spec)
    xin = x.float().to(torch.float8_e4m3fn) if spec.quant.name == "fp8" else x
    cutlass_fused_moe(
        **flashinfer_kwargs(spec, xin, p, tw, ids, out, ActivationType(p.meta["activation"]), [1, 2])
    )
    ((args, kwargs),) = calls
    # The binding's order (flashinfer_cutlass_fused_moe_binding.cu, runMoe): output, input, ids, scales,
    # fc1 w, fc1 b, fc2 w, fc2 b, output dtype, quant scales, input_sf, swiglu alpha/beta/limit, ...
    t = p.tensors
    assert args[0] is out and args[1] is xin
    assert args[2].dtype == torch.int32 and torch.equal(args[2], ids.int())
    assert args[3].dtype == torch.float32
    assert args[4] is t["fc1"] and args[6] is t["fc2"]
    assert args[5] is t.get("fc1_bias") and args[7] is t.get("fc2_bias")
    assert args[8] == spec.dtype
    scales = {
        "fp8": ("fc1_dequant", "fc2_quant", "fc2_dequant", "fc1_input_scale"),
        "fp8_block": ("fc1_block_scale", "fc2_block_scale"),
        "mxfp4": ("fc1_scale", "fc2_scale"),
    }.get(spec.quant.name, ())
    assert [s.data_ptr() for s in args[9]] == [t[k].data_ptr() for k in scales]
    assert args[11] is t.get("swiglu_alpha") and args[13] is t.get("swiglu_limit")
    assert (args[18], args[19], args[20], args[21]) == (1, 0, spec.ep_size, spec.ep_rank)  # tp, ep
    assert kwargs["activation_type"] == ActivationType(p.meta["activation"])
    tactics = cutlass.FIXED_TACTICS if spec.quant.name == "fp8_block" else [1, 2]
    assert kwargs["profile_ids"] == tactics and kwargs["enable_pdl"] is True  # FlashInfer's SM90 default
    assert kwargs["use_deepseek_fp8_block_scale"] is (spec.quant.name == "fp8_block")
    assert (
        kwargs["use_w4_group_scaling"] is (spec.quant.name == "mxfp4")
        and kwargs["use_fused_finalize"] is True
    )


def test_apply_takes_tactics_from_the_tune_cache_once_per_layer(tmp_path, monkeypatch):
    from moe_plugin_nvidia import tuning

    monkeypatch.setenv("MOE_NVIDIA_TUNE_DIR", str(tmp_path))
    monkeypatch.setattr(tuning, "_PACKAGE_DIR", tmp_path / "none")
    tuning.clear_cache()
    calls = []
    monkeypatch.setattr(cutlass, "_flashinfer", lambda: (lambda **kw: calls.append(kw), None))
    monkeypatch.setattr(cutlass, "_ACT", {v: f"act{v}" for v in cutlass.ACTIVATION_TYPES.values()})
    spec = _spec()
    p, x, tw, ids, out = _call(spec, T=40)
    p.meta["device_name"] = "NVIDIA H200"
    with pytest.warns(UserWarning, match="moe tune"):
        cutlass.apply(spec, x, p, tw, ids, out)
    # untuned: FlashInfer's default tactics, passed explicitly (None costs an autotuner lookup per call)
    assert calls[-1]["profile_ids"] == cutlass.DEFAULT_TACTICS == [-1, -1]
    assert calls[-1]["activation_type"] == "act3"
    name = tuning.table_name("NVIDIA H200")
    entry = {"buckets": {"1": [1, 11], "32": [2, 22]}}
    tuning.merge_table(tmp_path / name, "NVIDIA H200", "0.7.2", {tuning.layer_key(spec): entry})
    cutlass.apply(spec, x, p, tw, ids, out)  # resolved once per prepared layer: still untuned
    assert calls[-1]["profile_ids"] == [-1, -1]
    p2 = prepare(spec, random_expert_weights(spec), SM90)
    p2.meta["device_name"] = "NVIDIA H200"
    cutlass.apply(spec, x, p2, tw, ids, out)
    assert calls[-1]["profile_ids"] == [2, 22]
    cutlass.apply(spec, x[:3], p2, tw[:3], ids[:3], out[:3])
    assert calls[-1]["profile_ids"] == [1, 11]


def test_apply_keeps_the_layer_arguments_until_a_tensor_is_replaced(monkeypatch):
    calls = []
    monkeypatch.setattr(cutlass, "_flashinfer", lambda: (lambda **kw: calls.append(kw), None))
    monkeypatch.setattr(cutlass, "_ACT", {v: v for v in cutlass.ACTIVATION_TYPES.values()})
    spec = _spec(activation="swiglu_oai", has_bias=True)
    p, x, tw, ids, out = _call(spec, T=3)
    p.meta["_tactics"] = None  # untuned, no warning
    cutlass.apply(spec, x, p, tw, ids.long(), out)
    cutlass.apply(spec, x[:2], p, tw[:2].double(), ids[:2].int(), out[:2])
    first, second = calls
    assert second["input"] is not first["input"] and second["output"].shape == (2, spec.hidden_size)
    assert second["token_selected_experts"].dtype == torch.int32
    assert second["token_final_scales"].dtype == torch.float32
    for name in ("fc1_expert_weights", "fc2_expert_biases", "swiglu_limit"):
        assert second[name] is first[name]
    fc1 = p.tensors["fc1"].clone()
    p.tensors["fc1"] = fc1  # replaced after the first calls: the next call passes the new tensor
    cutlass.apply(spec, x, p, tw, ids, out)
    assert (
        calls[-1]["fc1_expert_weights"] is fc1
        and calls[-1]["fc2_expert_biases"] is first["fc2_expert_biases"]
    )
    # the same arguments as the uncached translation
    kw = flashinfer_kwargs(spec, x, p, tw, ids, out, cutlass.ACTIVATION_TYPES[spec.activation], [-1, -1])
    assert set(kw) == set(calls[-1])
    for k, v in kw.items():
        got = calls[-1][k]
        assert (got is v or torch.equal(got, v)) if isinstance(v, torch.Tensor) else got == v, k


def test_deepgemm_falls_back_to_the_precompiled_gemm_without_nvcc(monkeypatch, tmp_path):
    for var in ("TRTLLM_DG_ENABLED", "TRTLLM_DG_NVCC_COMPILER", "CUDA_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc anywhere
    with pytest.warns(UserWarning, match="TRTLLM_DG_ENABLED=0"):
        cutlass.deepgemm_jit_check()
    assert cutlass.os.environ["TRTLLM_DG_ENABLED"] == "0"
    cutlass.deepgemm_jit_check()  # set now: left alone, no second warning
    monkeypatch.delenv("TRTLLM_DG_ENABLED")
    nvcc = tmp_path / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    cutlass.deepgemm_jit_check()  # an nvcc on PATH: DeepGEMM stays on
    assert "TRTLLM_DG_ENABLED" not in cutlass.os.environ


def _module_signature() -> inspect.Signature:
    """The signature of the compiled module's ``cutlass_fused_moe`` entry, read from FlashInfer's
    source (the function is defined inside ``get_cutlass_fused_moe_module``, which loads the
    CUDA module: not here)."""
    import ast

    import flashinfer.fused_moe.core as core

    tree = ast.parse(inspect.getsource(core))
    loader = next(
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef) and n.name == "get_cutlass_fused_moe_module"
    )
    fn = next(n for n in ast.walk(loader) if isinstance(n, ast.FunctionDef) and n.name == "cutlass_fused_moe")
    names = [a.arg for a in fn.args.args]
    defaults = [eval(compile(ast.Expression(d), "<default>", "eval"), vars(core)) for d in fn.args.defaults]
    first_default = len(names) - len(defaults)
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Signature(
        [
            inspect.Parameter(
                n, kind, default=defaults[i - first_default] if i >= first_default else inspect._empty
            )
            for i, n in enumerate(names)
        ]
    )


@needs_flashinfer
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"activation": "gelu", "dtype": torch.float16},
        {"quant": FP8_PT},
        {"ep_size": 4, "ep_rank": 1, "has_bias": True},
        BLOCK,
        {**MX, "hidden_size": 128, "activation": "swiglu_oai", "has_bias": True},
    ],
)
def test_module_call_passes_what_flashinfers_wrapper_passes(monkeypatch, kw):
    """The plugin's keywords, given to the module entry (the default call), bind to exactly
    the arguments FlashInfer's public wrapper gives it for the same call."""
    import flashinfer.fused_moe.core as core
    from flashinfer.fused_moe import ActivationType, cutlass_fused_moe

    sig = _module_signature()
    calls = []

    def entry(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        calls.append(dict(bound.arguments))
        return [args[0] if args else kwargs["output"]]

    entry.__signature__ = sig

    class Module:
        cutlass_fused_moe = staticmethod(entry)

    monkeypatch.setattr(core, "get_compute_capability", lambda device: (9, 0))
    monkeypatch.setattr(core, "get_cutlass_fused_moe_module", lambda arch: Module())
    monkeypatch.setattr(core, "is_cuda_version_at_least", lambda v: True, raising=False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    spec = _spec(**kw)
    p, x, tw, ids, out = _call(spec)
    xin = x.float().to(torch.float8_e4m3fn) if spec.quant.name == "fp8" else x
    kwargs = flashinfer_kwargs(spec, xin, p, tw, ids, out, ActivationType(p.meta["activation"]), [1, 2])
    cutlass_fused_moe(**kwargs)
    fn = cutlass.module_entry(torch.device("cuda", 0), kwargs)
    assert fn is entry
    fn(**kwargs)
    wrapper, plugin = calls
    assert set(wrapper) == set(plugin)
    for k, v in wrapper.items():
        assert plugin[k] is v if isinstance(v, torch.Tensor) or v is None else plugin[k] == v, k
    import flashinfer

    monkeypatch.setattr(flashinfer, "__version__", "0.7.3")  # a wrapper not read: the public call
    assert cutlass.module_entry(torch.device("cuda", 0), kwargs) is None
    monkeypatch.setattr(flashinfer, "__version__", "0.7.2")
    assert cutlass.module_entry(torch.device("cuda", 0), [*kwargs, "no_such_argument"]) is None


def test_module_call_is_the_default_and_opted_out_by_env(monkeypatch):
    entry = object()
    monkeypatch.setattr(cutlass, "module_entry", lambda device, keys: entry)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    layer = {"fc1_expert_weights": types.SimpleNamespace(device=torch.device("cuda", 0))}
    monkeypatch.delenv("MOE_NVIDIA_MODULE_CALL", raising=False)
    assert cutlass._module_call(layer) == (entry, None)
    monkeypatch.setenv("MOE_NVIDIA_MODULE_CALL", "1")
    assert cutlass._module_call(layer) == (entry, None)
    monkeypatch.setenv("MOE_NVIDIA_MODULE_CALL", "0")
    assert cutlass._module_call(layer) is None
    monkeypatch.delenv("MOE_NVIDIA_MODULE_CALL")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert cutlass._module_call(layer) == (entry, 0)  # with several devices: compared on each call
    layer = {"fc1_expert_weights": torch.empty(1)}
    assert cutlass._module_call(layer) is None  # a CPU layer: the public call


def test_apply_calls_the_module_entry_when_resolved(monkeypatch):
    public, module = [], []
    monkeypatch.setattr(cutlass, "_flashinfer", lambda: (lambda **kw: public.append(kw), None))
    monkeypatch.setattr(cutlass, "_ACT", {v: v for v in cutlass.ACTIVATION_TYPES.values()})
    spec = _spec()
    p, x, tw, ids, out = _call(spec, T=3)
    p.meta["_tactics"] = None
    cutlass.apply(spec, x, p, tw, ids, out)  # CPU tensors: the public call
    assert len(public) == 1 and not module
    monkeypatch.setattr(cutlass, "_module_call", lambda layer: (lambda **kw: module.append(kw), None))
    p.cache.clear()
    cutlass.apply(spec, x, p, tw, ids, out)
    assert len(public) == 1 and len(module) == 1
    assert set(module[0]) == set(public[0])
    monkeypatch.setattr(cutlass, "_module_call", lambda layer: (lambda **kw: module.append(kw), 5))
    p.cache.clear()
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    cutlass.apply(spec, x, p, tw, ids, out)  # another current device than the layer's: the public call
    assert len(public) == 2 and len(module) == 1
