"""portable.triton.fused_moe with quantized weights (fp8, fp8_block, mxfp4) against the float64 reference.

Every case quantizes its weights with ``moe_core.quant`` once and hands the
SAME quantized weights to the kernel and to ``fused_experts_reference(...,
compute_dtype=float64)``. Weights span several binades (experts at 2**-6, 1,
2**6; rows at 2**-3, 1, 2**3; tokens at 2**-6, 1, 2**6, or 2**+-2 in fp16) so
that wrongly applied scales cannot hide.

Bound: ``TOLERANCES[dtype]``, the unquantized kernel's, tighter than
``tolerance(spec)`` by its activation-quantization allowance (3e-2). The
kernel's fp8 quantization is bit-exact with ``moe_core.quant`` (same scales,
same codes: ``test_prepass_is_bit_exact``), and GEMM 1 feeds its quantizer
float32 (an fp8 code then differs from the reference's only where float32 and
float64 GEMM-1 outputs straddle a rounding boundary: a relative gap of about
1e-7 against e4m3's 2**-4, about 1e-5 of the codes); mxfp4 weights dequantize
exactly. What is left is what the bf16/fp16 kernel has too: the rounding of
the per-slot outputs and of the combined output to the activation dtype
(and, for W4A16, of the intermediate). Measured over 3 seeds of every case here:
bf16 at most 7.6e-3 (fp8, fp8_block, W4A8) and 1.14e-2 (W4A16, whose bf16
intermediate is rounded like the unquantized kernel's); fp16 at most 3.2e-4.
"""

from __future__ import annotations

import math

import pytest
import torch

from moe_core import DeviceInfo, MoESpec, QuantScheme, moe_apply, moe_plan
from moe_core import quant as mq
from moe_core.presets import get_preset
from moe_core.reference import fused_experts_reference
from moe_core.testing import TOLERANCES, random_expert_weights, random_routing, relative_error, tolerance
from moe_plugin_portable import configs, experts

from ..gpu_checks import no_host_sync
from .helpers import DEVICE, HAS_GPU, assert_graph_replay_matches_eager, gpu, needs_triton

KERNEL = "portable.triton.fused_moe"

SCHEMES = {
    "fp8-channel-token": QuantScheme("fp8"),
    "fp8-tensor-token": QuantScheme("fp8", weight_scale="per_tensor"),
    "fp8-channel-static": QuantScheme("fp8", activation="fp8_per_tensor"),
    "fp8-tensor-static": QuantScheme("fp8", weight_scale="per_tensor", activation="fp8_per_tensor"),
    # 128 x 128 blocks: two K blocks (the second partial) in both GEMMs at H=200, I=136
    "fp8_block": QuantScheme("fp8_block"),
    # small blocks: several per row and column, one straddling the gate/up boundary of w13
    "fp8_block-32x32": QuantScheme("fp8_block", block_shape=(32, 32)),
    "mxfp4-w4a16": QuantScheme("mxfp4"),
    "mxfp4-w4a8": QuantScheme("mxfp4", activation="fp8_per_tensor"),
}
#: small odd shapes (mxfp4 needs multiples of 32 along K)
SHAPES = {
    "fp8": {"num_experts": 7, "top_k": 3, "hidden_size": 72, "intermediate_size": 40},
    "fp8_block": {"num_experts": 5, "top_k": 2, "hidden_size": 200, "intermediate_size": 136},
    "mxfp4": {"num_experts": 7, "top_k": 3, "hidden_size": 160, "intermediate_size": 96},
}
SWIGLU = {"activation": "swiglu_oai", "has_bias": True, "swiglu_limit": 5.0}


def _shape(name: str) -> dict:
    if name == "fp8_block":
        return SHAPES["fp8_block"]
    return SHAPES["mxfp4" if name.startswith("mxfp4") else "fp8"]


def _spec(name: str, **changes) -> MoESpec:
    return MoESpec(**{**_shape(name), "quant": SCHEMES[name], **changes})


def bound(spec: MoESpec) -> float:
    """The module docstring's bound: the unquantized kernel's (no activation-quantization allowance)."""
    return TOLERANCES[spec.dtype]


def _pow2_cycle(n: int, step: int, device: str) -> torch.Tensor:
    """``2**(-step), 1, 2**step, 2**(-step), ...`` of length ``n``."""
    return torch.exp2(step * ((torch.arange(n, device=device) % 3) - 1).double()).float()


def spread_weights(weights, spec: MoESpec):
    """High-precision weights spanning binades: experts x 2**+-6, rows of w13 x 2**+-3.

    ``w2`` is divided by the square of the expert's factor, so each expert's output stays O(1).
    """
    E, N1 = weights.w13.shape[:2]
    f = _pow2_cycle(E, 6, weights.w13.device)
    rows = _pow2_cycle(N1, 3, weights.w13.device)
    weights.w13 = weights.w13 * f[:, None, None] * rows[None, :, None]
    weights.w2 = weights.w2 / (f * f)[:, None, None]
    return weights


def _inputs(spec: MoESpec, T: int, seed: int, device: str = DEVICE):
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.randn(T, spec.hidden_size, generator=gen, device=device) * 1.5
    # per-token scales over 12 binades (4 in fp16, whose outputs would overflow)
    x = (x * _pow2_cycle(T, 6 if spec.dtype == torch.bfloat16 else 2, device)[:, None]).to(spec.dtype)
    topk_w = torch.rand(T, spec.top_k, generator=gen, device=device) + 0.05
    ids = torch.rand(T, spec.num_experts, generator=gen, device=device).argsort(dim=1)[:, : spec.top_k].int()
    return x, topk_w, ids


def _weights(spec: MoESpec, seed: int, device: str = DEVICE):
    """(high-precision spread weights, the same quantized with moe_core.quant)."""
    high = spread_weights(random_expert_weights(spec, device=device, seed=seed, quantize=False), spec)
    return high, mq.quantize_weights(high, spec.quant)


def _check(spec: MoESpec, T: int, seed: int, *, from_high: bool = False, limit: float | None = None):
    plan = moe_plan(spec, DEVICE)
    assert plan.kernel == KERNEL, plan.explain()
    high, weights = _weights(spec, seed)
    x, topk_w, ids = _inputs(spec, T, seed)
    prepared = plan.prepare(high if from_high else weights)
    out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device=DEVICE)
    moe_apply(plan, x, prepared, topk_w, ids, out=out)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    err = relative_error(out, want)
    limit = bound(spec) if limit is None else limit
    assert err <= limit, f"relative error {err:.3e} > {limit:.1e} for {spec.describe()}"
    return err


# ----------------------------------------------------------------------------- the quantizers


@needs_triton
@pytest.mark.parametrize("mode", ["fp8_per_token", "fp8_group", "fp8_per_tensor"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [200, 8200])
def test_prepass_is_bit_exact(mode, dtype, cols):
    """The activation pre-pass gives moe_core.quant's codes and scales, bit for bit (per token:
    200 columns from one load, 8200 looped twice over 1024-column steps)."""
    scheme = {
        "fp8_per_token": QuantScheme("fp8"),
        "fp8_group": QuantScheme("fp8_block", block_shape=(128, 32)),
        "fp8_per_tensor": QuantScheme("fp8", activation="fp8_per_tensor"),
    }[mode]
    spec = MoESpec(4, 1, cols, 64, quant=scheme, dtype=dtype)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(9, cols, generator=gen, device=DEVICE) * _pow2_cycle(9, 7, DEVICE)[:, None]
    x[6, cols - 1] = 4.0 * x[6].abs().max()  # the row's max in its last column
    x[3] = 0.0  # an all-zero row: scale 1
    x[4, :50] = 2.0**-14 * torch.arange(50, device=DEVICE)  # e4m3 subnormals (a group of them)
    x[5, 7] = -0.0
    x = x.to(dtype)
    q = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=DEVICE)
    static = torch.tensor([0.0173], device=DEVICE)
    scale = experts._scale_buffer(spec, 9, cols, torch.device(DEVICE))
    kernel, grid, args, kwargs = experts.quantize_launch(spec, x, q, scale, static_scale=static)
    if mode == "fp8_per_token":
        assert kwargs.get("ONE_PASS", False) == (cols < 8192)
    kernel[grid](*args, **kwargs)
    if mode == "fp8_per_token":
        q_ref, s_ref = mq.quantize_fp8_per_token(x)
        assert torch.equal(scale, s_ref[:, 0])
    elif mode == "fp8_group":
        q_ref, s_ref = mq.quantize_fp8_group(x, 32)
        assert torch.equal(scale, s_ref)
    else:
        q_ref = mq.quantize_fp8_per_tensor(x, static)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


# ----------------------------------------------------------------------------- against the reference

#: (scheme, case): every scheme with silu at T=1 and T=33 and swiglu_oai + biases at T=7
CASES = [(name, act, T) for name in SCHEMES for act, T in (("silu", 1), ("swiglu_oai-bias", 7), ("silu", 33))]


@needs_triton
@pytest.mark.parametrize(("name", "act", "T"), CASES)
def test_matches_reference(name, act, T):
    _check(_spec(name, **(SWIGLU if act != "silu" else {})), T, seed=T)


FEATURES = {
    "fp8-channel-token/ep": ("fp8-channel-token", {"ep_size": 3, "ep_rank": 2}),
    "fp8_block-32x32/expert_map": ("fp8_block-32x32", {"expert_map": (2, -1, 0, -1, 1, -1, -1)}),
    "mxfp4-w4a16/expert_map": ("mxfp4-w4a16", {"expert_map": (-1, 1, -1, 0, -1, -1, 2), **SWIGLU}),
    "mxfp4-w4a8/ep-k1": ("mxfp4-w4a8", {"top_k": 1, "ep_size": 2, "ep_rank": 1, **SWIGLU}),
    "fp8-channel-token/weight-on-input": (
        "fp8-channel-token",
        {"top_k": 1, "apply_router_weight_on_input": True, "has_bias": True},
    ),
    "fp8-tensor-static/weight-on-input": (
        "fp8-tensor-static",
        {"top_k": 1, "apply_router_weight_on_input": True},
    ),
    "mxfp4-w4a16/k1-direct": ("mxfp4-w4a16", {"top_k": 1}),
    "fp8_block-32x32/relu2-bias": ("fp8_block-32x32", {"activation": "relu2", "has_bias": True}),
    "fp8-tensor-token/gelu": ("fp8-tensor-token", {"activation": "gelu"}),
    "fp8-channel-token/fp16": ("fp8-channel-token", {"dtype": torch.float16, **SWIGLU}),
    "fp8_block-32x32/fp16": ("fp8_block-32x32", {"dtype": torch.float16}),
    "mxfp4-w4a8/fp16": ("mxfp4-w4a8", {"dtype": torch.float16, **SWIGLU}),
}


@needs_triton
@pytest.mark.parametrize("case", sorted(FEATURES))
def test_features(case):
    name, changes = FEATURES[case]
    _check(_spec(name, **changes), 7, seed=len(case))


@needs_triton
@pytest.mark.parametrize("name", ["fp8_block-32x32", "fp8-tensor-static", "mxfp4-w4a8"])
def test_prepare_quantizes_high_precision_weights(name):
    """``prepare`` on canonical float weights quantizes them with moe_core.quant: same tensors, same result."""
    spec = _spec(name, **SWIGLU)
    plan = moe_plan(spec, DEVICE)
    high, weights = _weights(spec, seed=5)
    a, b = plan.prepare(high).tensors, plan.prepare(weights).tensors
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(
            a[key].view(torch.uint8), b[key].view(torch.uint8)
        )
    _check(spec, 7, seed=5, from_high=True)


@needs_triton
@pytest.mark.parametrize("name", ["fp8_block-32x32", "fp8-channel-token", "mxfp4-w4a8"])
def test_empty_batch_and_skewed_load(name):
    spec = _spec(name)
    plan = moe_plan(spec, DEVICE)
    prepared = plan.prepare(_weights(spec, seed=0)[1])
    H, k = spec.hidden_size, spec.top_k
    x = torch.empty(0, H, dtype=spec.dtype, device=DEVICE)
    ids = torch.empty(0, k, dtype=torch.int32, device=DEVICE)
    empty = moe_apply(plan, x, prepared, torch.empty(0, k, device=DEVICE), ids)
    assert empty.shape == (0, H)
    # every token on the same experts: one expert spans several sorting blocks (T = 33 > block_m)
    weights = _weights(spec, seed=3)[1]
    x, topk_w, _ = _inputs(spec, 33, seed=3)
    ids = torch.tensor([[4, 0, 6][:k]] * 33, dtype=torch.int32, device=DEVICE) % spec.num_experts
    out = torch.full((33, H), float("nan"), dtype=spec.dtype, device=DEVICE)
    moe_apply(plan, x, plan.prepare(weights), topk_w, ids, out=out)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= bound(spec)


@needs_triton
def test_fp8_block_intermediate_fused_and_prepass():
    """GEMM 1 quantizes the intermediate in its epilogue when ``block_n`` holds whole groups, else a pre-pass does."""
    spec = _spec("fp8_block-32x32", **SWIGLU)
    weights = _weights(spec, seed=9)[1]
    prepared = moe_plan(spec, DEVICE).prepare(weights)
    x, topk_w, ids = _inputs(spec, 19, seed=9)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    for block_n, prepasses in ((64, 1), (16, 2)):
        gemm = configs.GemmConfig(block_n, 32, 4, 2, 8)
        cfg = configs.MoEConfig(16, gemm, configs.GemmConfig(32, 32, 4, 2, 8))
        out = torch.full_like(x, float("nan"))
        blocks = experts.sort_tokens(spec, ids, prepared.tensors, 16)
        launches = experts.fused_moe_launches(spec, x, prepared.tensors, topk_w, ids, out, cfg, blocks)
        assert sum(launch[0].__name__ == "moe_quant_fp8" for launch in launches) == prepasses
        for kernel, grid, args, kwargs in launches:
            kernel[grid](*args, **kwargs)
        assert relative_error(out, want) <= bound(spec), block_n


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The per-expert matrix read in the wrong order (a transposed scale layout), same shape."""
    return t.transpose(-1, -2).contiguous().reshape(t.shape)


MUTATIONS = {
    # [E, 2I] read as [E, I, 2]: gate and up scales interleaved
    "fp8-channel-token": ("w13_scale", lambda s: _transposed(s.reshape(s.shape[0], 2, -1)).reshape(s.shape)),
    "fp8-tensor-static": ("w2_scale", lambda s: s.roll(1, 0)),
    "fp8_block-32x32": ("w2_scale", _transposed),
    "mxfp4-w4a16": ("w13_scale", lambda s: s.roll(1, 1)),
}


@needs_triton
@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_wrong_scale_is_caught(name):
    """A scale in the wrong order (transposed, rolled) fails the bound by far: the check has teeth."""
    spec = _spec(name)
    plan = moe_plan(spec, DEVICE)
    weights = _weights(spec, seed=2)[1]
    x, topk_w, ids = _inputs(spec, 7, seed=2)
    prepared = plan.prepare(weights)
    key, mutate = MUTATIONS[name]
    before = prepared.tensors[key]
    prepared.tensors[key] = mutate(before)
    assert prepared.tensors[key].shape == before.shape and not torch.equal(prepared.tensors[key], before)
    out = moe_apply(plan, x, prepared, topk_w, ids)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    err = relative_error(out, want)
    assert err > 4 * bound(spec), f"a wrong {key} gave only {err:.3e}"


# ----------------------------------------------------------------------------- planning and configs


def test_plans_portable_for_quantized_schemes(monkeypatch):
    """Chosen on Hopper without the nvidia plugin (with it, FlashInfer's kernels rank above where
    built); on gfx950 usable (the AMD plugin's Gluon mxfp4 kernel ranks above it there)."""
    monkeypatch.setenv("MOE_DISABLE_PLUGINS", "nvidia")
    for name in SCHEMES:
        plan = moe_plan(_spec(name), DeviceInfo.parse("sm_90"))
        assert plan.kernel == KERNEL, plan.explain()
        plan = moe_plan(_spec(name), DeviceInfo.parse("gfx950"), backend=KERNEL)
        assert plan.kernel == KERNEL, plan.explain()


@pytest.mark.parametrize(
    ("spec", "device", "reason"),
    [
        (MoESpec(8, 2, 64, 32, quant="fp8"), "sm_80", "needs sm_89"),
        (MoESpec(8, 2, 64, 32, quant="fp8_block"), "gfx90a", "fp8 e4m3 dot needs one of"),
        (MoESpec(8, 2, 64, 32, quant="mxfp4", dtype=torch.float16), "sm_90", "needs bf16 activations"),
        (MoESpec(8, 2, 64, 32, quant="fp8", dtype=torch.float32), "sm_90", "need bf16 or fp16"),
        (
            MoESpec(8, 2, 64, 32, quant=QuantScheme("fp8_block", block_shape=(128, 48))),
            "sm_90",
            "power-of-two",
        ),
        (MoESpec(8, 2, 64, 32, quant="nvfp4"), "sm_100", "quant nvfp4 not supported"),
    ],
)
def test_supports_refuses_precisely(spec, device, reason):
    plan = moe_plan(spec, DeviceInfo.parse(device))
    line = next(line for line in plan.explain().splitlines() if line.strip().startswith(KERNEL))
    assert reason in line and plan.kernel != KERNEL, line


def test_layer_keys_and_heuristic():
    bf16 = get_preset("deepseek-v3-tp8").moe_spec()
    fp8b = get_preset("deepseek-v3-tp8").moe_spec(quant="fp8_block")
    assert configs.layer_key(bf16) == "E=257,H=7168,I=256,k=9,bfloat16"  # the shipped tables' keys
    assert configs.layer_key(fp8b) == "E=257,H=7168,I=256,k=9,bfloat16,fp8_block/a:fp8_group/b:128x128"
    keys = {configs.layer_key(bf16.replace(quant=q)) for q in SCHEMES.values()}
    assert len(keys) == len(SCHEMES)
    for T in (1, 64, 8192):
        base = configs.heuristic_config(bf16, T, 132, False)
        cfg = configs.heuristic_config(fp8b, T, 132, False)
        assert cfg.block_m == base.block_m and cfg.gemm1.block_k == cfg.gemm2.block_k == 128
    small = _spec("fp8_block-32x32")
    assert configs.heuristic_config(small, 7, 8, False).gemm1.block_k == 32
    mx = get_preset("gpt-oss-20b").moe_spec(quant="mxfp4")
    small, big = (configs.heuristic_config(mx, T, 132, False) for T in (1, 8192))
    assert small.gemm1.block_k == big.gemm1.block_k == 128
    # transposed mxfp4 tiles: weight rows are the MMA's M side (64, 128 ungated at 64+ rows), fewer
    # only where the grid is short of programs
    assert big.gemm1.block_n == 64 and big.gemm2.block_n == 128 and small.gemm1.block_n < 64


# ----------------------------------------------------------------------------- GPU, real shapes

GPU_CASES = [
    ("deepseek-v3-tp8", QuantScheme("fp8_block")),
    ("qwen3-30b-a3b", QuantScheme("fp8")),
    ("qwen3-30b-a3b", QuantScheme("fp8", weight_scale="per_tensor", activation="fp8_per_tensor")),
    ("gpt-oss-20b", QuantScheme("mxfp4")),
    ("gpt-oss-20b", QuantScheme("mxfp4", activation="fp8_per_tensor")),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("model", "scheme"), GPU_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("T", [1, 8, 129, 2048])
def test_gpu_real_shapes(model, scheme, T):
    preset = get_preset(model)
    spec = preset.moe_spec(torch.bfloat16, quant=scheme)
    plan = moe_plan(spec, "cuda")
    assert plan.kernel == KERNEL, plan.explain()
    weights = random_expert_weights(spec, device="cuda", seed=T)
    prepared = plan.prepare(weights)
    x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
    topk_w, topk_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
    out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device="cuda")
    with no_host_sync():
        moe_apply(plan, x, prepared, topk_w, topk_ids, out=out)
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    err = relative_error(out, want)
    # tolerance(spec): fp8 tensor-core accumulation is not the interpreter's float32
    assert err <= tolerance(spec), f"{err:.3e}"

    assert_graph_replay_matches_eager(plan, prepared, preset, x, topk_w, topk_ids, seed=T + 100)


@gpu
@pytest.mark.gpu
def test_gpu_prepare_from_high_precision():
    preset = get_preset("gpt-oss-20b")
    spec = preset.moe_spec(torch.bfloat16, quant="mxfp4")
    plan = moe_plan(spec, "cuda")
    high = random_expert_weights(spec, device="cuda", seed=0, quantize=False)
    weights = mq.quantize_weights(high, spec.quant)
    x = torch.randn(64, spec.hidden_size, device="cuda").to(spec.dtype)
    topk_w, topk_ids = random_routing(preset.routing, 64, preset.num_experts, device="cuda", seed=0)
    out = moe_apply(plan, x, plan.prepare(high), topk_w, topk_ids)
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert math.isfinite(relative_error(out, want)) and relative_error(out, want) <= tolerance(spec)


@needs_triton
@pytest.mark.parametrize("name", ["mxfp4-w4a16", "mxfp4-w4a8"])
def test_mxfp4_dot_scaled_path(name, monkeypatch):
    """The ``tl.dot_scaled`` variant of the transposed mxfp4 tiles (weights as its left operand, in
    the canonical nibble order) matches the reference; the interpreter runs it when forced. Its
    ``dot_scaled`` rounds bf16 through fp16, so the data stay within fp16's range (no binade
    spread) here."""
    monkeypatch.setattr(
        experts, "_mx_dot", lambda spec, interpret, block_m, tuned=None: spec.quant.name == "mxfp4"
    )
    spec = _spec(name, **SWIGLU)
    weights = random_expert_weights(spec, device=DEVICE, seed=3)
    gen = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(9, spec.hidden_size, generator=gen, device=DEVICE).to(spec.dtype)
    topk_w = torch.rand(9, spec.top_k, generator=gen, device=DEVICE) + 0.05
    ids = torch.rand(9, spec.num_experts, generator=gen, device=DEVICE).argsort(dim=1)[:, : spec.top_k].int()
    plan = moe_plan(spec, DEVICE)
    out = torch.full((9, spec.hidden_size), float("nan"), dtype=spec.dtype, device=DEVICE)
    moe_apply(plan, x, plan.prepare(weights), topk_w, ids, out=out)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= bound(spec)


@needs_triton
@pytest.mark.skipif(HAS_GPU, reason="the GPU runs the PTX itself (test_gpu_mxfp4_ptx_is_bit_exact)")
@pytest.mark.parametrize("name", ["mxfp4-w4a16", "mxfp4-w4a8"])
def test_mxfp4_ptx_path_interpreted(name, monkeypatch):
    """The sorted path with the PTX dequantization (``MX_PTX``: weights at ``2**-MX_PTX_SHIFT``,
    the epilogues multiplying back) under the interpreter, the PTX run by the emulator of
    tests/portable/ptx_emulator.py: the same bits as the portable dequantization, weights over
    several binades."""
    from triton.runtime.interpreter import InterpreterBuilder

    from ..gluon_interpreter import create_inline_asm

    monkeypatch.setenv("MOE_PORTABLE_DECODE", "0")
    monkeypatch.setattr(InterpreterBuilder, "create_inline_asm", create_inline_asm)
    spec = _spec(name, **SWIGLU)
    weights = _weights(spec, seed=4)[1]
    x, topk_w, ids = _inputs(spec, 9, seed=4)
    plan = moe_plan(spec, DEVICE)
    prepared = plan.prepare(weights)
    outs = []
    for ptx in (True, False):
        monkeypatch.setattr(experts, "_mx_ptx", lambda *args, ptx=ptx, **kw: ptx)
        out = torch.full((9, spec.hidden_size), float("nan"), dtype=spec.dtype, device=DEVICE)
        outs.append(moe_apply(plan, x, prepared, topk_w, ids, out=out))
    assert torch.equal(outs[0], outs[1])
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    assert relative_error(outs[0], want) <= bound(spec)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("scheme", [QuantScheme("mxfp4"), QuantScheme("mxfp4", activation="fp8_per_tensor")])
@pytest.mark.parametrize("T", [1, 33, 300])
def test_gpu_mxfp4_ptx_is_bit_exact(scheme, T, monkeypatch):
    """The PTX dequantization (``MX_PTX``) and the portable one give the same bits: both weights are
    exact, the PTX path's ``2**-MX_PTX_SHIFT`` multiple only scales every product and sum by a power
    of two, which its epilogue undoes. Sorted path (the decode GEMV has no PTX variant), weights
    over several binades."""
    monkeypatch.setenv("MOE_PORTABLE_DECODE", "0")
    preset = get_preset("gpt-oss-20b")
    spec = preset.moe_spec(torch.bfloat16, quant=scheme)
    plan = moe_plan(spec, "cuda")
    weights = random_expert_weights(spec, device="cuda", seed=T)
    gen = torch.Generator(device="cuda").manual_seed(T)
    spread = 2.0 ** torch.randint(-4, 5, weights.w13_scale.shape, generator=gen, device="cuda")
    weights.w13_scale = (weights.w13_scale.int() + spread.log2().int()).clamp(40, 150).to(torch.uint8)
    prepared = plan.prepare(weights)
    x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
    topk_w, topk_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
    outs = {}
    for ptx in ("1", "0"):
        monkeypatch.setenv("MOE_PORTABLE_MX_PTX", ptx)
        outs[ptx] = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device="cuda")
        moe_apply(plan, x, prepared, topk_w, topk_ids, out=outs[ptx])
    assert torch.equal(outs["1"], outs["0"])
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert relative_error(outs["1"], want) <= tolerance(spec)
