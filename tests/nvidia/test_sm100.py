"""nvidia.flashinfer.trtllm / cute_dsl on the CPU: refusals on faked devices, every prepare transform and its
inverse, the FlashInfer calls bound to its real signatures and run through its real Python wrappers.

No SM100 GPU runs here: what FlashInfer's kernels do with these layouts is settled only by an SM100 run.
"""

from __future__ import annotations

import ast
import inspect
import re

import pytest
import torch

from moe_core import DeviceInfo, MoESpec, QuantScheme, moe_plan
from moe_core import quant as mq
from moe_core.errors import UnsupportedError
from moe_core.planner import run_experts
from moe_core.testing import random_expert_weights
from moe_plugin_nvidia import cutlass, sm100
from moe_plugin_nvidia.sm100 import KERNEL, flashinfer_kwargs, prepare, supports, to_canonical

from .helpers import fake_install, needs_flashinfer

SM90 = DeviceInfo.parse("sm_90")
SM100 = DeviceInfo.parse("sm_100")
SM107 = DeviceInfo.parse("sm_107")
#: E % 4 == 0, H and I multiples of 128, 2I a multiple of the 128-row epilogue tile; H != I.
BASE = {"num_experts": 12, "top_k": 3, "hidden_size": 384, "intermediate_size": 256}
BLOCK = {"quant": "fp8_block"}
MX = {"quant": "mxfp4"}
OAI = {"activation": "swiglu_oai", "swiglu_alpha": 1.5, "swiglu_limit": 6.0}


def _spec(**kw) -> MoESpec:
    return MoESpec(**{**BASE, **kw})


@pytest.fixture
def cubins(monkeypatch, tmp_path):
    """FlashInfer's trtllm-gen cubin package complete on disk in a FLASHINFER_CUBIN_DIR; returns its folder."""
    monkeypatch.delenv(sm100.ALLOW_DOWNLOAD_ENV, raising=False)
    monkeypatch.delenv("MOE_NVIDIA_ALLOW_JIT", raising=False)
    monkeypatch.setenv("FLASHINFER_CUBIN_DIR", str(tmp_path))
    folder = tmp_path / (sm100.bmm_subdir() or "pin/batched_gemm-test/")
    names = ["include/flashinferMetaInfo.h", "Bmm_Bfloat16_a.cubin", "Bmm_E2m1_b.cubin"]
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        (folder / n).write_bytes(b"x")
    (folder / "checksums.txt").write_text("".join(f"{'ab' * 32} {n}\n" for n in names))
    return folder


# -- planning and refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, BLOCK, MX, {**MX, **OAI, "has_bias": True}, {**BLOCK, **OAI}])
def test_planner_picks_trtllm_on_sm100(monkeypatch, cubins, kw):
    fake_install(monkeypatch)
    spec = _spec(**kw)
    plan = moe_plan(spec, SM100)
    # unverified on hardware: ranked below the cutlass kernel where that runs the layer
    expected = KERNEL if cutlass.supports(spec, SM100) else cutlass.KERNEL
    assert plan.kernel == expected, plan.explain()
    assert re.search(r"nvidia\.flashinfer\.trtllm +p=60 +(CHOSEN|usable)", plan.explain()), plan.explain()
    assert moe_plan(spec, SM100, backend=KERNEL).kernel == KERNEL
    line = next(ln for ln in moe_plan(spec, SM90).explain().splitlines() if KERNEL in ln)
    assert "refused: needs compute capability >=10.0 (cuda>=10.0,<11.0); device is nvidia:sm_90" in line, line


def test_explain_on_sm100_says_why_trtllm_is_refused(monkeypatch, cubins):
    fake_install(monkeypatch)
    text = moe_plan(_spec(has_bias=True), SM100).explain()
    line = next(ln for ln in text.splitlines() if KERNEL in ln)
    assert "refused: bf16: FlashInfer's trtllm_bf16_routed_moe takes no biases" in line, text
    line = next(ln for ln in moe_plan(_spec(quant="nvfp4"), SM100).explain().splitlines() if KERNEL in ln)
    assert "refused: nvfp4: FlashInfer's trtllm-gen nvfp4 path" in line, line


@pytest.mark.parametrize(
    ("install", "kw", "device", "needle"),
    [
        ({}, {}, SM90, "runs on SM100 (Blackwell) only, got sm_90"),
        ({}, {}, DeviceInfo.parse("cpu"), "runs on SM100 (Blackwell) only, got cpu"),
        ({}, {"dtype": torch.float16}, SM100, "needs bf16 activations, got float16"),
        ({}, {"quant": "nvfp4"}, SM100, "nvfp4: FlashInfer's trtllm-gen nvfp4 path takes nvfp4-quantized"),
        ({}, {"quant": "fp8"}, SM100, "takes bf16, fp8_block, mxfp4 in this plugin, not fp8"),
        ({}, {"has_bias": True}, SM100, "trtllm_bf16_routed_moe takes no biases"),
        ({}, {**BLOCK, "has_bias": True}, SM100, "trtllm_fp8_block_scale_routed_moe passes no biases"),
        ({}, {"quant": QuantScheme("fp8_block", block_shape=(64, 128))}, SM100, "128x128 weight blocks"),
        (
            {},
            {"quant": QuantScheme("mxfp4", activation="fp8_per_tensor")},
            SM100,
            "(W4A8, MxE4m3) is not wired",
        ),
        (
            {},
            {"activation": "gelu"},
            SM100,
            "bf16: activation gelu not wired to trtllm-gen (silu, swiglu_oai)",
        ),
        ({}, {**BLOCK, "activation": "relu2"}, SM100, "fp8_block: activation relu2 not wired"),
        ({}, {"hidden_size": 320}, SM100, "H and I multiples of 128 (128-row epilogue tiles"),
        ({}, {**MX, "intermediate_size": 96}, SM100, "got H=384, I=96"),
        ({}, {"num_experts": 10}, SM100, "num_experts divisible by 4, got 10"),
        ({}, {"num_experts": 4, "top_k": 4}, SM100, "top_k < num_experts and top_k <= 32, got 4"),
        ({}, {"num_experts": 64, "top_k": 33}, SM100, "got 33"),
        ({}, {"num_experts": 20, "ep_size": 3}, SM100, "equal slices"),
        ({}, {"expert_map": (0, -1, 1, *([-1] * 9))}, SM100, "contiguous slice"),
        ({"version": None}, {}, SM100, "flashinfer-python is not installed"),
        ({"version": "0.6.9"}, MX, SM100, "too old (need >= 0.7.2)"),
        ({"built": False}, {}, SM100, "FlashInfer's fused_moe_trtllm_sm100 is not built"),
        ({"built": False}, BLOCK, SM107, "fused_moe_trtllm_sm107 is not built"),
        ({"built": False}, MX, SM100, "`moe nvidia build` builds only fused_moe_90"),
    ],
)
def test_supports_refuses_precisely(monkeypatch, cubins, install, kw, device, needle):
    fake_install(monkeypatch, **install)
    reason = supports(_spec(**kw), device)
    assert reason is not None and needle in reason, reason


def test_supports_accepts(monkeypatch, cubins):
    fake_install(monkeypatch)
    for kw in (
        {},
        OAI,
        {"ep_size": 4, "ep_rank": 3},
        {"expert_map": (*([-1] * 6), *range(6))},
        BLOCK,
        {**BLOCK, **OAI, "ep_size": 2, "ep_rank": 1},
        MX,
        {**MX, **OAI, "has_bias": True, "ep_size": 3, "ep_rank": 2},
    ):
        assert supports(_spec(**kw), SM100) is None, kw
    assert supports(_spec(), DeviceInfo.parse("sm_103")) is None


def test_missing_cubins_refuse_unless_download_allowed(monkeypatch, cubins):
    fake_install(monkeypatch)
    (cubins / "Bmm_E2m1_b.cubin").unlink()
    reason = supports(_spec(**MX), SM100)
    assert "cubins are not on disk" in reason and "1 of 3 files missing" in reason, reason
    assert "flashinfer download-cubin" in reason and "MOE_NVIDIA_ALLOW_DOWNLOAD=1" in reason
    (cubins / "checksums.txt").unlink()
    assert "no checksums.txt" in supports(_spec(), SM100)
    monkeypatch.setenv(sm100.ALLOW_DOWNLOAD_ENV, "1")
    assert supports(_spec(), SM100) is None


def test_cubin_dir_follows_flashinfer(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHINFER_CUBIN_DIR", str(tmp_path / "c"))
    assert sm100.cubin_dir() == tmp_path / "c"
    monkeypatch.delenv("FLASHINFER_CUBIN_DIR")
    monkeypatch.setenv("FLASHINFER_WORKSPACE_BASE", str(tmp_path))
    monkeypatch.setattr(sm100.importlib.util, "find_spec", lambda name: None)
    assert sm100.cubin_dir() == tmp_path / ".cache" / "flashinfer" / "cubins"


@needs_flashinfer
def test_bmm_subdir_is_flashinfers_artifact_path():
    from flashinfer.artifacts import ArtifactPath

    assert sm100.bmm_subdir() == ArtifactPath.TRTLLM_GEN_BMM


def test_allow_jit_accepts_a_missing_module(monkeypatch, cubins):
    fake_install(monkeypatch, built=False)
    monkeypatch.setenv("MOE_NVIDIA_ALLOW_JIT", "1")
    assert supports(_spec(), SM100) is None


def test_cute_dsl_stays_planning_only_with_a_precise_reason(monkeypatch):
    fake_install(monkeypatch)
    spec = _spec(quant="nvfp4")
    reason = sm100.cute_dsl_supports(spec, SM100)
    assert "registered for planning only" in reason or "needs nvidia-cutlass-dsl" in reason, reason
    assert "takes nvfp4, not bf16" in sm100.cute_dsl_supports(_spec(), SM100)
    assert "SM100 (Blackwell) only, got sm_90" in sm100.cute_dsl_supports(spec, SM90)
    entry = next(e for e in sm100.kernel_entries() if e.name == sm100.CUTE_KERNEL)
    with pytest.raises(UnsupportedError, match="planning only"):
        entry.prepare(spec, None, SM100)


# -- prepare -----------------------------------------------------------------------------------


def test_swizzle_128x4_places_each_element_and_inverts():
    sf = torch.randint(0, 256, (2, 256, 12), dtype=torch.uint8)
    swz = sm100.swizzle_128x4(sf)
    assert swz.shape == sf.shape and torch.equal(sm100.unswizzle_128x4(swz), sf)
    flat = swz.reshape(2, -1)
    for r, c in [(0, 0), (1, 0), (31, 3), (32, 0), (97, 2), (127, 11), (128, 4), (255, 7)]:
        tile = (r // 128) * (12 // 4) + c // 4
        pos = tile * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
        assert flat[1, pos] == sf[1, r, c], (r, c)


@needs_flashinfer
def test_swizzle_128x4_equals_flashinfers_torch_reference():
    ref_mod = pytest.importorskip("flashinfer.experimental.b12x.moe._shared.kernels.reference_flashinfer")
    sf = torch.randint(0, 256, (3, 384, 8), dtype=torch.uint8)
    want = ref_mod._block_scale_interleave_128x4_torch(sf)
    assert torch.equal(sm100.swizzle_128x4(sf).reshape(-1), want)


def _reference_rows(up_gate_e: torch.Tensor, gated: bool) -> torch.Tensor:
    """One expert's GEMM rows as FlashInfer's public helpers lay them out (gated reorder, then the shuffle)."""
    from flashinfer.fused_moe.core import reorder_rows_for_gated_act_gemm
    from flashinfer.quantization.fp4_quantization import shuffle_matrix_a

    x = reorder_rows_for_gated_act_gemm(up_gate_e) if gated else up_gate_e
    return shuffle_matrix_a(x.contiguous(), sm100.EPILOGUE_TILE_M)


@needs_flashinfer
@pytest.mark.parametrize("kw", [{}, OAI, {"ep_size": 3, "ep_rank": 1}])
def test_prepare_bf16_is_flashinfers_layout_and_round_trips(kw):
    from flashinfer.fused_moe.core import convert_to_block_layout
    from flashinfer.fused_moe.prepare import prepare_trtllm_bf16_weights

    spec = _spec(**kw)
    w = random_expert_weights(spec, seed=11)
    p = prepare(spec, w, SM100)
    t = p.tensors
    E, H, inter = spec.num_local_experts, spec.hidden_size, spec.intermediate_size
    assert t["gemm1"].shape == (E, H // 64, 2 * inter, 64) and t["gemm1"].dtype == torch.bfloat16
    assert t["gemm2"].shape == (E, inter // 64, H, 64) and t["gemm2"].is_contiguous()
    up_gate = torch.cat([w.w13[:, inter:], w.w13[:, :inter]], dim=1)
    e = E - 1
    want = convert_to_block_layout(_reference_rows(up_gate[e], True).view(torch.uint8), 128).view(
        torch.bfloat16
    )
    assert torch.equal(t["gemm1"][e], want)
    fi = prepare_trtllm_bf16_weights(
        up_gate, w.w2, num_local_experts=E, hidden_size=H, intermediate_size=inter
    )
    assert torch.equal(t["gemm1"], fi["gemm1_weights"]) and torch.equal(t["gemm2"], fi["gemm2_weights"])
    assert p.meta["local_expert_offset"] == spec.ep_rank * E and p.meta["activation"] == 3
    assert p.meta["module"] == "fused_moe_trtllm_sm100" and p.meta["enable_pdl"] is True
    if spec.activation == "swiglu_oai":
        assert torch.equal(t["gemm1_alpha"], torch.full((E,), 1.5))
        assert torch.equal(t["gemm1_beta"], torch.ones(E)) and torch.equal(
            t["gemm1_clamp"], torch.full((E,), 6.0)
        )
    else:
        assert not {"gemm1_alpha", "gemm1_beta", "gemm1_clamp"} & set(t)
    back = to_canonical(spec, p)
    assert back.tensors().keys() == w.tensors().keys()
    for name, ref in w.tensors().items():
        assert torch.equal(getattr(back, name), ref), name


def test_prepare_fp8_block_quantizes_and_swaps_blocks_with_their_scales():
    spec = _spec(**BLOCK)
    high = random_expert_weights(spec, seed=6, quantize=False)
    p = prepare(spec, high, SM100)
    t = p.tensors
    E, H, inter = spec.num_experts, spec.hidden_size, spec.intermediate_size
    assert t["gemm1"].dtype == torch.float8_e4m3fn and t["gemm1"].shape == (E, 2 * inter, H)
    assert (
        t["gemm1_scale"].shape == (E, 2 * inter // 128, H // 128) and t["gemm1_scale"].dtype == torch.float32
    )
    assert t["gemm2"].shape == (E, H, inter) and t["gemm2_scale"].shape == (E, H // 128, inter // 128)
    quantized = random_expert_weights(spec, seed=6)  # the reference quantizer, same data
    nb = inter // 128
    assert torch.equal(t["gemm1"][:, :inter].view(torch.uint8), quantized.w13[:, inter:].view(torch.uint8))
    assert torch.equal(t["gemm1_scale"][:, :nb], quantized.w13_scale[:, nb:].float())  # up blocks first
    back = to_canonical(spec, p)
    assert torch.equal(back.w13.view(torch.uint8), quantized.w13.view(torch.uint8))
    assert torch.equal(back.w2.view(torch.uint8), quantized.w2.view(torch.uint8))
    assert torch.equal(back.w13_scale, quantized.w13_scale.float())
    assert torch.equal(back.w2_scale, quantized.w2_scale.float())


@needs_flashinfer
@pytest.mark.parametrize("kw", [MX, {**MX, **OAI, "has_bias": True, "ep_size": 2, "ep_rank": 1}])
def test_prepare_mxfp4_shuffles_swizzles_and_round_trips(kw):
    spec = _spec(**kw)
    w = random_expert_weights(spec, seed=8)
    p = prepare(spec, w, SM100)
    t = p.tensors
    E, H, inter = spec.num_local_experts, spec.hidden_size, spec.intermediate_size
    assert t["gemm1"].shape == (E, 2 * inter, H // 2) and t["gemm1"].dtype == torch.uint8
    assert t["gemm2"].shape == (E, H, inter // 2) and t["gemm2"].dtype == torch.uint8
    assert t["gemm1_scale"].shape == (E, 2 * inter, H // 32) and t["gemm1_scale"].dtype == torch.float8_e4m3fn
    assert t["gemm2_scale"].shape == (E, H, inter // 32) and t["gemm2_scale"].dtype == torch.float8_e4m3fn
    up_gate = torch.cat([w.w13[:, inter:], w.w13[:, :inter]], dim=1)
    up_gate_s = torch.cat([w.w13_scale[:, inter:], w.w13_scale[:, :inter]], dim=1)
    for e in (0, E - 1):
        assert torch.equal(t["gemm1"][e], _reference_rows(up_gate[e], True))
        assert torch.equal(t["gemm2"][e], _reference_rows(w.w2[e], False))
        want = sm100.swizzle_128x4(_reference_rows(up_gate_s[e], True))
        assert torch.equal(t["gemm1_scale"][e].view(torch.uint8), want)
    if spec.has_bias:
        assert t["gemm1_bias"].dtype == torch.float32 and t["gemm1_bias"].shape == (E, 2 * inter)
        b_up_gate = torch.cat([w.b13[:, inter:], w.b13[:, :inter]], dim=1).float()
        assert torch.equal(t["gemm1_bias"][0], _reference_rows(b_up_gate[0].unsqueeze(-1), True).squeeze(-1))
        assert torch.equal(
            t["gemm2_bias"][1], _reference_rows(w.b2[1].float().unsqueeze(-1), False).squeeze(-1)
        )
    back = to_canonical(spec, p)
    assert back.tensors().keys() == w.tensors().keys()
    for name, ref in w.tensors().items():
        assert torch.equal(getattr(back, name), ref), name
    high = random_expert_weights(spec, seed=8, quantize=False)  # quantized by prepare: the same codes
    assert torch.equal(prepare(spec, high, SM100).tensors["gemm1"], t["gemm1"])


@needs_flashinfer
def test_mxfp4_permutations_are_flashinfers_and_reorder_interleaves_up_and_gate():
    p1, p2 = sm100._row_permutations(512, 384)
    s1, _ = sm100._sf_row_permutations(512, 384)
    assert (
        torch.equal(p1, s1)
        and sorted(p1.tolist()) == list(range(512))
        and sorted(p2.tolist()) == list(range(384))
    )
    from flashinfer.fused_moe.core import get_reorder_rows_for_gated_act_gemm_row_indices

    interleave = get_reorder_rows_for_gated_act_gemm_row_indices(torch.empty(512, 1))
    assert interleave[:4].tolist() == [0, 256, 1, 257]  # [up; gate] rows -> up0, gate0, up1, gate1


def test_prepare_refuses_what_it_cannot_lay_out():
    spec = _spec(num_experts=20, ep_size=3, ep_rank=0)
    with pytest.raises(UnsupportedError, match="equal slices"):
        prepare(spec, random_expert_weights(spec), SM100)
    spec = _spec(quant="nvfp4")
    with pytest.raises(UnsupportedError, match="nvfp4"):
        prepare(spec, random_expert_weights(spec), SM100)


def test_fp8_block_input_is_quantized_in_1x128_groups_with_transposed_scales():
    spec = _spec(**BLOCK)
    x = torch.randn(5, spec.hidden_size).to(torch.bfloat16)
    q, scale = sm100.kernel_input(spec, x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (5, spec.hidden_size)
    assert (
        scale.dtype == torch.float32 and scale.shape == (spec.hidden_size // 128, 5) and scale.is_contiguous()
    )
    ref_q, ref_s = mq.quantize_fp8_group(x, 128)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_s.t())
    torch.testing.assert_close(mq.dequantize_fp8_group(q, scale.t()), x.float(), rtol=0.07, atol=1e-2)
    x2, s2 = sm100.kernel_input(_spec(), x)
    assert x2 is x and s2 is None


# -- the FlashInfer call -----------------------------------------------------------------------


def _call(spec, T=7, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = random_expert_weights(spec, seed=seed)
    p = prepare(spec, w, SM100)
    x = torch.randn(T, spec.hidden_size, generator=gen).to(spec.dtype)
    tw = torch.rand(T, spec.top_k, generator=gen) + 0.1
    ids = torch.stack([torch.randperm(spec.num_experts, generator=gen)[: spec.top_k] for _ in range(T)])
    out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype)
    return p, x, tw, ids, out


def _documented(spec, T):
    """Shapes and dtypes of the tensor arguments, as FlashInfer's docstrings and launcher checks state them."""
    E, H, inter = spec.num_local_experts, spec.hidden_size, spec.intermediate_size
    f32, f8 = torch.float32, torch.float8_e4m3fn
    docs = {"output": ((T, H), torch.bfloat16)}
    if spec.activation == "swiglu_oai":
        docs.update({n: ((E,), f32) for n in ("gemm1_alpha", "gemm1_beta", "gemm1_clamp_limit")})
    name = spec.quant.name
    if name == "bf16":
        docs.update(
            hidden_states=((T, H), torch.bfloat16),
            gemm1_weights=((E, H // 64, 2 * inter, 64), torch.bfloat16),  # [E, K/block_k, M, block_k]
            gemm2_weights=((E, inter // 64, H, 64), torch.bfloat16),
        )
    elif name == "fp8_block":
        docs.update(
            hidden_states=((T, H), f8),
            hidden_states_scale=((H // 128, T), f32),
            gemm1_weights=((E, 2 * inter, H), f8),
            gemm1_weights_scale=((E, 2 * inter // 128, H // 128), f32),
            gemm2_weights=((E, H, inter), f8),
            gemm2_weights_scale=((E, H // 128, inter // 128), f32),
        )
    else:
        docs.update(
            hidden_states=((T, H), torch.bfloat16),
            gemm1_weights=((E, 2 * inter, H // 2), torch.uint8),
            gemm1_weights_scale=((E, 2 * inter, H // 32), f8),
            gemm2_weights=((E, H, inter // 2), torch.uint8),
            gemm2_weights_scale=((E, H, inter // 32), f8),
        )
        if spec.has_bias:
            docs.update(gemm1_bias=((E, 2 * inter), f32), gemm2_bias=((E, H), f32))
    return docs


def _check_bound(spec, real, kw):
    """Bind ``kw`` to FlashInfer's real signature and check every tensor against its documentation."""
    sig = inspect.signature(real)
    bound = sig.bind(**kw)
    required = {n for n, prm in sig.parameters.items() if prm.default is inspect.Parameter.empty}
    assert required <= set(bound.arguments)
    T = kw["hidden_states"].shape[0]
    docs = _documented(spec, T)
    for name, (shape, dtype) in docs.items():
        t = bound.arguments[name]
        assert tuple(t.shape) == shape and t.dtype == dtype, (name, tuple(t.shape), t.dtype)
        assert t.is_contiguous(), name
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor) and name not in docs:
            raise AssertionError(f"undocumented tensor argument {name}")
    ids, weights = bound.arguments["topk_ids"]
    assert (
        ids.dtype == torch.int32
        and weights.dtype == torch.float32
        and ids.shape == weights.shape == (T, spec.top_k)
    )
    return bound.arguments


CASES = [
    {},
    OAI,
    {"ep_size": 4, "ep_rank": 2},
    BLOCK,
    {**BLOCK, **OAI, "ep_size": 2, "ep_rank": 1},
    MX,
    {**MX, **OAI, "has_bias": True, "ep_size": 3, "ep_rank": 1},
]


@needs_flashinfer
@pytest.mark.parametrize("kw", CASES)
def test_kwargs_bind_to_flashinfers_signature(kw):
    import flashinfer.fused_moe as fm

    spec = _spec(**kw)
    p, x, tw, ids, out = _call(spec)
    x_in, x_scale = sm100.kernel_input(spec, x)
    real = getattr(fm, sm100.FLASHINFER_FUNCTIONS[spec.quant.name])
    args = _check_bound(spec, real, flashinfer_kwargs(spec, x_in, x_scale, p, tw, ids, out))
    assert args["output"] is out and args["num_experts"] == spec.num_experts and args["top_k"] == spec.top_k
    assert args["local_num_experts"] == spec.num_local_experts
    assert args["local_expert_offset"] == spec.ep_rank * spec.num_local_experts
    assert args["intermediate_size"] == spec.intermediate_size and args["routing_method_type"] == 5
    assert args["routed_scaling_factor"] is None and args["do_finalize"] is True


@needs_flashinfer
@pytest.mark.parametrize("kw", CASES)
def test_planned_apply_makes_the_documented_call(monkeypatch, cubins, kw):
    """moe_plan on a faked SM100 -> plan.prepare -> the plan's kernel call (``run_experts``, what moe_apply runs
    after its checks, which refuse a simulated device) on CPU tensors, FlashInfer's function replaced by a
    recorder bound to its real signature."""
    import flashinfer.fused_moe as fm

    fake_install(monkeypatch)
    spec = _spec(**kw)
    plan = moe_plan(spec, SM100, backend=KERNEL)  # unverified trtllm ranks below cutlass by default
    assert plan.kernel == KERNEL, plan.explain()
    w = random_expert_weights(spec, seed=4)
    prepared = plan.prepare(w)
    _, x, tw, ids, _ = _call(spec, T=5, seed=9)
    ids = ids.long()  # int64 in: FlashInfer gets int32
    real = getattr(fm, sm100.FLASHINFER_FUNCTIONS[spec.quant.name])
    seen = {}

    def recorder(**kwargs):
        seen.update(_check_bound(spec, real, kwargs))
        kwargs["output"].copy_(kwargs["hidden_states"].float() * 0 + 3.0)

    monkeypatch.setattr(sm100, "_flashinfer", lambda: {spec.quant.name: recorder})
    y = run_experts(plan, x, prepared, tw, ids, None)
    assert torch.equal(y, torch.full_like(y, 3.0)) and seen["output"].data_ptr() == y.data_ptr()
    got_ids, got_w = seen["topk_ids"]
    assert torch.equal(got_ids, ids.int()) and torch.equal(got_w, tw)  # unpacked: exactly the given routing
    t = prepared.tensors
    assert seen["gemm1_weights"] is t["gemm1"] and seen["gemm2_weights"] is t["gemm2"]
    if spec.quant.name != "bf16":
        assert (
            seen["gemm1_weights_scale"] is t["gemm1_scale"]
            and seen["gemm2_weights_scale"] is t["gemm2_scale"]
        )
    if spec.quant.name == "fp8_block":
        ref_q, ref_s = mq.quantize_fp8_group(x, 128)
        assert torch.equal(seen["hidden_states"].view(torch.uint8), ref_q.view(torch.uint8))
        assert torch.equal(seen["hidden_states_scale"], ref_s.t())
        assert seen["fp8_quantization_type"] == 1 and seen["weight_layout"] == 0
        assert seen["use_shuffled_weight"] is False
    else:
        assert seen["hidden_states"] is x
    if spec.quant.name == "bf16":
        assert seen["weight_layout"] == 2 and seen["use_shuffled_weight"] is True
    assert seen.get("gemm1_clamp_limit") is t.get("gemm1_clamp") and seen.get("gemm1_bias") is t.get(
        "gemm1_bias"
    )


def test_apply_writes_a_strided_out_through_a_contiguous_buffer(monkeypatch):
    spec = _spec()
    monkeypatch.setattr(sm100, "kernel_input", lambda s, x: (x, None))
    monkeypatch.setattr(sm100, "flashinfer_kwargs", lambda *a: {"output": a[-1]})
    monkeypatch.setattr(sm100, "_flashinfer", lambda: {"bf16": lambda **kw: kw["output"].fill_(5.0)})
    big = torch.zeros(4, 2 * spec.hidden_size, dtype=torch.bfloat16)
    out = big[:, ::2]
    x = torch.randn(4, spec.hidden_size).to(torch.bfloat16)
    sm100.apply(spec, x, None, None, None, out)
    assert (out == 5.0).all() and not big[:, 1::2].any()


def _op_params(name: str) -> list[str]:
    """Parameter names of FlashInfer's (nested) op ``name`` in fused_moe/core.py, read from its source."""
    import flashinfer.fused_moe.core as core

    tree = ast.parse(inspect.getsource(core))
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    return [a.arg for a in fn.args.args]


@needs_flashinfer
@pytest.mark.parametrize("kw", CASES)
def test_recorded_call_through_flashinfers_wrappers(monkeypatch, kw):
    """Run FlashInfer's real routed wrapper on CPU tensors with a recording trtllm-gen module: the
    positional call into its op carries our tensors in the op's named slots."""
    import flashinfer.fused_moe as fm
    import flashinfer.fused_moe.core as core
    from flashinfer.tllm_enums import RoutingInputMode

    calls = {}

    class Module:
        def __getattr__(self, op):
            params = _op_params(f"{op}_op")

            def record(*args):
                calls[op] = dict(zip(params, args, strict=True))
                return [calls[op]["output"]]

            return record

    monkeypatch.setattr(core, "get_trtllm_moe_sm100_module", lambda: Module())
    spec = _spec(**kw)
    p, x, tw, ids, out = _call(spec)
    x_in, x_scale = sm100.kernel_input(spec, x)
    real = getattr(fm, sm100.FLASHINFER_FUNCTIONS[spec.quant.name])
    real(**flashinfer_kwargs(spec, x_in, x_scale, p, tw, ids, out))
    ((op, a),) = calls.items()
    assert op == {"bf16": "trtllm_bf16_moe", "fp8_block": "trtllm_fp8_block_scale_moe"}.get(
        spec.quant.name, "trtllm_fp4_block_scale_moe"
    )
    t = p.tensors
    assert a["routing_input_mode"] == RoutingInputMode.UnpackedPrecomputed and a["routing_logits"] is None
    assert torch.equal(a["topk_ids"], ids.int()) and a["topk_ids"].dtype == torch.int32
    weights = a.get("expert_weights", a.get("topk_weights"))
    assert weights is tw
    assert a["hidden_states"] is x_in and a["output"] is out
    assert a["gemm1_weights"] is t["gemm1"] and a["gemm2_weights"] is t["gemm2"]
    assert a["num_experts"] == spec.num_experts and a["top_k"] == spec.top_k
    assert a["local_expert_offset"] == spec.ep_rank * spec.num_local_experts
    assert a.get("local_num_experts", a.get("num_local_experts")) == spec.num_local_experts
    assert a["routing_method_type"] == 5 and a["do_finalize"] is True and a["enable_pdl"] is True
    assert a["activation_type"] == 3 and a["gemm1_alpha"] is t.get("gemm1_alpha")
    assert a["gemm1_beta"] is t.get("gemm1_beta") and a["gemm1_clamp_limit"] is t.get("gemm1_clamp")
    if spec.quant.name == "bf16":
        assert a["use_shuffled_weight"] is True and a["weight_layout"] == 2
    elif spec.quant.name == "fp8_block":
        assert a["hidden_states_scale"] is x_scale and a["fp8_quantization_type"] == 1
        assert a["gemm1_weights_scale"] is t["gemm1_scale"] and a["gemm2_weights_scale"] is t["gemm2_scale"]
        assert a["use_shuffled_weight"] is False and a["weight_layout"] == 0
        assert a["gemm1_bias"] is None and a["gemm2_bias"] is None
    else:
        assert a["hidden_states_scale"] is None
        assert a["gemm1_weights_scale"] is t["gemm1_scale"] and a["gemm2_weights_scale"] is t["gemm2_scale"]
        assert a["gemm1_bias"] is t.get("gemm1_bias") and a["gemm2_bias"] is t.get("gemm2_bias")
        assert a["output1_scale_scalar"] is None and a["output2_scale_scalar"] is None
