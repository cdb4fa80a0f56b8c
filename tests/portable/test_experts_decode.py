"""The decode path of portable.triton.fused_moe (2 launches, no sort, no combine) against the reference.

Forced with ``MOE_PORTABLE_DECODE=1`` so every T here runs it (the rule alone would send
most of these small-E shapes to the sorted path); outputs are poisoned with NaN, so a row
that is never written (a token whose slots all go to other ranks must get zeros) fails.
Bounds: ``tolerance(spec)`` as for the sorted path (the quantized cases: the unquantized
kernel's bound, as in test_experts_quant.py: the activation quantization is bit-exact).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from moe_core import MoESpec, moe_apply, moe_plan
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, relative_error, tolerance
from moe_plugin_portable import _launch, configs, experts

from ..gpu_checks import no_host_sync
from . import test_experts_quant as tq
from .helpers import DEVICE, HAS_GPU, assert_graph_replay_matches_eager, gpu, needs_triton

KERNEL = "portable.triton.fused_moe"
BASE = {"num_experts": 7, "top_k": 3, "hidden_size": 72, "intermediate_size": 40}
CASES = {
    "silu": ({}, (1, 8)),
    "gelu-fp16": ({"activation": "gelu", "dtype": torch.float16}, (2,)),
    "swiglu_oai-alpha-limit-bias": (
        {"activation": "swiglu_oai", "has_bias": True, "swiglu_alpha": 1.3, "swiglu_limit": 1.5},
        (3,),
    ),
    "relu2-bias": ({"activation": "relu2", "has_bias": True}, (5,)),
    "even-k": ({"hidden_size": 128, "intermediate_size": 64}, (4,)),
    "ep": ({"ep_size": 3, "ep_rank": 2}, (7,)),
    "expert_map": ({"expert_map": (2, -1, 0, -1, 1, -1, -1)}, (6,)),
    "k1": ({"top_k": 1}, (1, 3)),
    "weight-on-input": ({"top_k": 1, "apply_router_weight_on_input": True, "has_bias": True}, (2,)),
}


def _run(spec: MoESpec, T: int, seed: int, weights=None, x=None, topk_w=None, ids=None):
    plan = moe_plan(spec, DEVICE)
    assert plan.kernel == KERNEL, plan.explain()
    weights = weights if weights is not None else random_expert_weights(spec, device=DEVICE, seed=seed)
    gen = torch.Generator(device=DEVICE).manual_seed(seed + 1)
    if x is None:
        x = (torch.randn(T, spec.hidden_size, generator=gen, device=DEVICE) * 1.5).to(spec.dtype)
        topk_w = torch.rand(T, spec.top_k, generator=gen, device=DEVICE) + 0.05
        ids = torch.rand(T, spec.num_experts, generator=gen, device=DEVICE).argsort(dim=1)[:, : spec.top_k]
        ids = ids.int()
    out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device=DEVICE)
    moe_apply(plan, x, plan.prepare(weights), topk_w, ids, out=out)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    return out, want


@needs_triton
@pytest.mark.parametrize(("case", "T"), [(c, T) for c, (_, ts) in sorted(CASES.items()) for T in ts])
def test_decode_matches_reference(case, T, monkeypatch):
    monkeypatch.setenv("MOE_PORTABLE_DECODE", "1")
    spec = MoESpec(**{**BASE, **CASES[case][0]})
    out, want = _run(spec, T, seed=T + len(case))
    err = relative_error(out, want)
    assert err <= tolerance(spec), f"relative error {err:.3e} > {tolerance(spec):.1e} for {spec.describe()}"


@needs_triton
def test_decode_dropped_tokens_are_zero(monkeypatch):
    """Under expert parallelism a token whose every slot is on another rank gets exact zeros."""
    monkeypatch.setenv("MOE_PORTABLE_DECODE", "1")
    spec = MoESpec(**BASE, expert_map=(2, -1, 0, -1, 1, -1, -1))
    ids = torch.tensor([[1, 3, 5], [0, 1, 2], [6, 5, 3]], dtype=torch.int32, device=DEVICE)
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(3, spec.hidden_size, generator=gen, device=DEVICE).to(spec.dtype)
    out, want = _run(spec, 3, 0, x=x, topk_w=torch.rand(3, 3, device=DEVICE), ids=ids)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[2], out[0])
    assert relative_error(out, want) <= tolerance(spec)


#: every quantized scheme through the decode kernels (T=2: two tokens, six entries)
QUANT_CASES = [
    ("fp8-channel-token", {}),
    ("fp8-channel-token", {"top_k": 1, "apply_router_weight_on_input": True, "has_bias": True}),
    ("fp8-tensor-static", tq.SWIGLU),
    ("fp8-channel-static", {"top_k": 1, "apply_router_weight_on_input": True}),
    ("fp8-tensor-token", {"ep_size": 3, "ep_rank": 1}),
    ("fp8_block", {}),
    ("fp8_block-32x32", tq.SWIGLU),
    ("mxfp4-w4a16", tq.SWIGLU),
    ("mxfp4-w4a8", {"expert_map": (-1, 1, -1, 0, -1, -1, 2)}),
]


@needs_triton
@pytest.mark.parametrize(
    ("name", "changes"), QUANT_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(QUANT_CASES)]
)
def test_decode_quantized(name, changes, monkeypatch):
    monkeypatch.setenv("MOE_PORTABLE_DECODE", "1")
    spec = tq._spec(name, **changes)
    _, weights = tq._weights(spec, seed=4)
    x, topk_w, ids = tq._inputs(spec, 2, seed=4)
    out, want = _run(spec, 2, 4, weights=weights, x=x, topk_w=topk_w, ids=ids)
    err = relative_error(out, want)
    assert err <= tq.bound(spec), f"relative error {err:.3e} > {tq.bound(spec):.1e} for {spec.describe()}"


#: (GEMM 1, GEMM 2) pre-quantized: each alone and both; both, read as rows (``A_PRE`` 1)
PREQUANT = [(True, False), (False, True), (True, True), (True, "rows")]


@needs_triton
@pytest.mark.parametrize(
    ("name", "changes"), QUANT_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(QUANT_CASES)]
)
def test_decode_prequant_is_bit_equal(name, changes, monkeypatch):
    """A GEMM whose input a pre-pass quantized (``prequant``) reads the same fp8 codes and scales as
    one quantizing in every program, and sums them in the same order: bit-equal outputs, whether
    it reads them in the weight tile's layout (``A_PRE`` 2) or as rows (1); the
    pre-passes are launched before their GEMMs (and only with fp8 activations)."""
    spec = tq._spec(name, **changes)
    _, weights = tq._weights(spec, seed=6)
    prepared = moe_plan(spec, DEVICE).prepare(weights)
    T = 3
    x, topk_w, ids = tq._inputs(spec, T, seed=6)
    base = configs.decode_heuristic(spec, T, 8, False)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    quantized = spec.quant.activation != "none"
    outs = []
    for pre1, pre2 in [(False, False), *PREQUANT]:
        rows = pre2 == "rows"
        monkeypatch.setattr(experts, "_A_TILE_MAX", 0 if rows else 1 << 20)  # rows / always the tile
        experts._decode_kwargs.cache_clear()
        pre2 = bool(pre2)
        cfg = configs.DecodeConfig(
            dataclasses.replace(base.gemm1, prequant=pre1), dataclasses.replace(base.gemm2, prequant=pre2)
        )
        launches = experts.decode_launches(spec, x, prepared.tensors, topk_w, ids, torch.empty_like(x), cfg)
        assert [launch[0].__name__ for launch in launches] == [
            *(["moe_quant_fp8"] if pre1 and quantized else []),
            "moe_decode_gemm1",
            *(["moe_quant_fp8"] if pre2 and quantized else []),
            "moe_decode_gemm2",
        ]
        read = 1 if rows or spec.quant.name == "mxfp4" else 2
        got = [launch[3]["A_PRE"] for launch in launches if launch[0].__name__ != "moe_quant_fp8"]
        assert got == [read if pre and quantized else 0 for pre in (pre1, pre2)]
        out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device=DEVICE)
        outs.append(experts.fused_moe(spec, x, prepared.tensors, topk_w, ids, out, config=cfg))
        err = relative_error(out, want)
        assert err <= tq.bound(spec), f"prequant {(pre1, pre2)}: relative error {err:.3e}"
    experts._decode_kwargs.cache_clear()
    for (pre1, pre2), out in zip(PREQUANT, outs[1:], strict=True):
        assert torch.equal(out, outs[0]), f"prequant {(pre1, pre2)} differs from in-kernel quantization"


def test_prequant_config_round_trips_and_is_tuned(monkeypatch):
    """``prequant`` is in a table entry only where set, ``MOE_PORTABLE_PREQUANT`` sets it; the
    tuner's decode space tries it with fp8 activations (a round before the splits), not without."""
    from moe_plugin_portable import tuning

    cpu = torch.device("cpu")
    for value in ("1", "0"):
        monkeypatch.setenv("MOE_PORTABLE_PREQUANT", value)
        found = configs.lookup_decode(MoESpec(**BASE), 1, cpu)
        assert found.gemm1.prequant == found.gemm2.prequant == (value == "1")
    monkeypatch.delenv("MOE_PORTABLE_PREQUANT")

    cfg = configs.GemmConfig(8, 128, 4, 3, 1, split=2, prequant=True)
    assert cfg.to_json()["prequant"] is True and "prequant" not in configs.GemmConfig(8, 128).to_json()
    assert configs.DecodeConfig.from_json({"gemm1": cfg.to_json(), "gemm2": cfg.to_json()}).gemm2 == cfg
    fp8_block = tq._spec("fp8_block")
    base = configs.decode_heuristic(fp8_block, 1, 132, False).gemm1
    rounds = tuning.decode_space(base, "quick", fp8_block)
    assert len(rounds) == 4 and all(c.prequant for c in rounds[1])
    assert any(c.block_n == 0 for c in rounds[1]) and {c.block_n for c in rounds[1]} == {0, 4, 8, 16}
    assert not any(c.prequant for r in (rounds[0], *rounds[2:]) for c in r)
    filled = list(tuning._filled(rounds[2], rounds[1][1]))  # the splits keep the best's prequant
    assert filled and all(c.prequant for c in filled)
    bf16 = MoESpec(**BASE)
    assert len(tuning.decode_space(configs.decode_heuristic(bf16, 1, 8, False).gemm1, "quick", bf16)) == 3
    # the heuristic: on AMD for dynamic fp8 activations; on NVIDIA for every fp8 activation,
    # static per-tensor at T > 1
    on = (
        ("fp8_block", True, 1),
        ("fp8-channel-token", True, 1),
        ("fp8_block", False, 1),
        ("fp8-channel-token", False, 8),
        ("fp8-tensor-static", False, 2),
    )
    off = (
        ("fp8-tensor-static", True, 8),
        ("fp8-tensor-static", False, 1),
        ("mxfp4-w4a16", True, 1),
        ("mxfp4-w4a16", False, 8),
    )
    for name, amd, tokens in on + off:
        cfg = configs.decode_heuristic(tq._spec(name), tokens, 256, amd)
        want = (name, amd, tokens) in on
        assert cfg.gemm1.prequant == cfg.gemm2.prequant == want, (name, amd, tokens)


# ----------------------------------------------------------------------------- tensor-core decode (Gluon)

MMA1 = configs.GemmConfig(32, 64, 2, 2, 1, split=2, mma=True)
MMA2 = configs.GemmConfig(16, 32, 1, 2, 1, split=3, mma=True)


def _names(spec, cfg, mma):
    x = torch.randn(2, spec.hidden_size).to(spec.dtype)
    ids = torch.tensor([[0, 1, 2]] * 2, dtype=torch.int32)[:, : spec.top_k]
    tensors = experts._prepare(spec, random_expert_weights(spec, seed=0), None)
    launches = experts.decode_launches(
        spec, x, tensors, torch.rand(2, spec.top_k), ids, torch.empty_like(x), cfg, mma=mma
    )
    return [launch[0].__name__ for launch in launches], launches


def test_mma_kernels_take_the_launches_they_fit():
    """With ``mma`` on a target that runs them, the tensor-core kernels take bf16/fp16 GEMMs and fp8
    ones with pre-quantized activations whose tiles fit; everything else stays on the Triton
    kernels (and on the CPU, or with ``mma`` off, everything)."""
    triton_only = ["moe_decode_gemm1", "moe_decode_gemm2"]
    bf16 = MoESpec(**BASE)
    cfg = configs.DecodeConfig(MMA1, MMA2)
    names, launches = _names(bf16, cfg, True)
    assert names == ["moe_decode_mma_gemm1", "moe_decode_mma_gemm2"]
    assert [launch[3]["EVEN_K"] for launch in launches] == [False, False]  # K = 72 and 40
    assert _names(bf16, cfg, False)[0] == triton_only
    assert _names(bf16, cfg, None)[0] == triton_only  # the CPU runs no Gluon
    narrow = configs.DecodeConfig(
        dataclasses.replace(MMA1, block_n=16), dataclasses.replace(MMA2, block_k=48)
    )
    assert _names(bf16, narrow, True)[0] == triton_only  # 16 rows for 2 warps; K step 48
    assert _names(MoESpec(**BASE, dtype=torch.float32), cfg, True)[0] == triton_only
    block = tq._spec("fp8_block-32x32")
    assert _names(block, cfg, True)[0] == triton_only  # quantized in the kernel
    pre32 = configs.DecodeConfig(
        dataclasses.replace(MMA1, prequant=True), dataclasses.replace(MMA2, prequant=True)
    )
    assert "_mma_" not in "".join(_names(block, pre32, True)[0])  # K steps of 32 fp8 codes: too short
    block = tq._spec("fp8-channel-token")
    pre = configs.DecodeConfig(
        dataclasses.replace(MMA1, prequant=True), dataclasses.replace(MMA2, block_k=64, prequant=True)
    )
    quant, mma1, mma2 = "moe_quant_fp8", "moe_decode_mma_gemm1", "moe_decode_mma_gemm2"
    assert _names(block, pre, True)[0] == [quant, mma1, quant, mma2]
    mx = tq._spec("mxfp4-w4a8")  # W4A8: pre-quantized codes, K steps of 128
    assert "_mma_" not in "".join(_names(mx, pre, True)[0])  # steps of 64 and 32: too short
    mx_cfg = configs.DecodeConfig(
        dataclasses.replace(MMA1, block_k=128, prequant=True),
        dataclasses.replace(MMA2, block_k=128, prequant=True),
    )
    assert _names(mx, mx_cfg, True)[0] == [quant, mma1, quant, mma2]
    w4a16 = configs.DecodeConfig(
        dataclasses.replace(MMA1, block_k=128), dataclasses.replace(MMA2, block_k=128)
    )
    assert _names(tq._spec("mxfp4-w4a16"), w4a16, True)[0] == [mma1, mma2]


def test_mx_stored_order_is_the_swizzle():
    """The tensor-core kernels read mxfp4 weights in stored (swizzled) order and the activations in
    the same order (``mx_canonical_index``): a product in that order is the canonical one."""
    pytest.importorskip("triton.experimental.gluon")
    from moe_core.quant import dequantize_mxfp4, quantize_mxfp4
    from moe_plugin_portable._details._decode_mma import mx_canonical_index

    K = 128
    canonical = torch.arange(K // 2, dtype=torch.int32).to(torch.uint8)[None, :]
    stored = experts.swizzle_mxfp4(canonical)[0].long()  # stored byte p holds canonical byte stored[p]
    kp = torch.arange(K)
    assert torch.equal(mx_canonical_index(kp), 2 * stored[kp // 2] + kp % 2)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, K, generator=gen)
    codes, scales = quantize_mxfp4(w)
    dense = dequantize_mxfp4(codes, scales).double()
    swizzled = dequantize_mxfp4(experts.swizzle_mxfp4(codes), scales).double()  # the stored order
    x = torch.randn(K, generator=gen, dtype=torch.float64)
    assert torch.allclose(swizzled @ x[mx_canonical_index(kp)], dense @ x, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(swizzled @ x, dense @ x)


def test_mma_config_flag_env_and_tuner_round(monkeypatch):
    from moe_plugin_portable import tuning

    assert MMA1.to_json()["mma"] is True and "mma" not in configs.GemmConfig(8, 64).to_json()
    assert configs.DecodeConfig.from_json({"gemm1": MMA1.to_json(), "gemm2": MMA2.to_json()}).gemm1 == MMA1
    spec = MoESpec(**BASE)
    for value in ("1", "0"):
        monkeypatch.setenv("MOE_PORTABLE_DECODE_MMA", value)
        found = configs.lookup_decode(spec, 1, torch.device("cpu"))
        assert found.gemm1.mma == found.gemm2.mma == (value == "1")
        if value == "1":  # fitted: rows a multiple of 16 per warp, about as many programs
            assert all(
                g.block_n % (16 * g.num_warps) == 0 and g.block_k >= 64 for g in (found.gemm1, found.gemm2)
            )
    monkeypatch.setenv("MOE_PORTABLE_DECODE_MMA", "1")  # fp8 activations: pre-quantized as well
    found = configs.lookup_decode(tq._spec("fp8_block"), 1, torch.device("cpu"))
    assert found.gemm1.prequant and found.gemm2.prequant and found.gemm1.mma
    monkeypatch.delenv("MOE_PORTABLE_DECODE_MMA")
    tile = configs.mma_tile(configs.GemmConfig(8, 512, 4, 3, 1, split=2))
    assert (tile.block_n, tile.num_warps, tile.split, tile.block_k, tile.mma) == (32, 2, 8, 512, True)
    assert configs.mma_tile(tile) == tile
    base = configs.decode_heuristic(spec, 1, 132, False).gemm1
    rounds = tuning.decode_space(base, "quick", spec, mma=True)
    mma_round = rounds[1]
    assert len(rounds) == 4 and len(mma_round) >= 8 and all(c.mma and not c.prequant for c in mma_round)
    assert all(c.block_n % (16 * c.num_warps) == 0 for c in mma_round)
    assert all(c.mma for c in tuning._filled(rounds[2], mma_round[0]))  # the splits keep it
    block = tq._spec("fp8_block")
    fp8_rounds = tuning.decode_space(
        configs.decode_heuristic(block, 1, 132, False).gemm1, "quick", block, True
    )
    assert len(fp8_rounds) == 5 and all(c.mma and c.prequant and c.block_k == 128 for c in fp8_rounds[2])
    mx = tq._spec("mxfp4-w4a16")
    mx_rounds = tuning.decode_space(configs.decode_heuristic(mx, 1, 132, False).gemm1, "quick", mx, True)
    assert len(mx_rounds) == 4 and all(
        c.mma and not c.prequant and c.block_k % 128 == 0 for c in mx_rounds[1]
    )
    fp32 = MoESpec(**BASE, dtype=torch.float32)
    assert (
        len(tuning.decode_space(configs.decode_heuristic(fp32, 1, 132, False).gemm1, "quick", fp32, True))
        == 3
    )
    assert len(tuning.decode_space(base, "quick", spec)) == 3  # not a target of those kernels


@needs_triton
@pytest.mark.parametrize("name", sorted(tq.MUTATIONS))
def test_decode_wrong_scale_is_caught(name, monkeypatch):
    """The decode kernels read every scale: one in the wrong order fails the bound by far."""
    monkeypatch.setenv("MOE_PORTABLE_DECODE", "1")
    spec = tq._spec(name)
    plan = moe_plan(spec, DEVICE)
    weights = tq._weights(spec, seed=2)[1]
    x, topk_w, ids = tq._inputs(spec, 3, seed=2)
    prepared = plan.prepare(weights)
    key, mutate = tq.MUTATIONS[name]
    prepared.tensors[key] = mutate(prepared.tensors[key])
    out = moe_apply(plan, x, prepared, topk_w, ids)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    assert relative_error(out, want) > 4 * tq.bound(spec)


@needs_triton
def test_decode_is_two_launches_without_sorting(monkeypatch):
    spec = MoESpec(**BASE)
    prepared = moe_plan(spec, DEVICE).prepare(random_expert_weights(spec, device=DEVICE))

    def no_sort(*args, **kwargs):
        raise AssertionError("the decode path must not sort")

    monkeypatch.setattr(experts, "sort_tokens", no_sort)
    launched = []
    monkeypatch.setattr(experts, "run_launch", lambda k, g, a, kw: launched.append((k.__name__, g)))
    x = torch.randn(1, spec.hidden_size, device=DEVICE).to(spec.dtype)
    ids = torch.tensor([[0, 4, 6]], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(x)
    experts.fused_moe(spec, x, prepared.tensors, torch.rand(1, 3, device=DEVICE), ids, out)  # T=1: the rule
    cfg = configs.decode_heuristic(spec, 1, 8, False)
    groups, chunks = configs.gemm2_split(cfg.gemm2.split, spec.top_k)
    assert launched == [
        ("moe_decode_gemm1", (3, -(-40 // cfg.gemm1.block_n), cfg.gemm1.split)),
        ("moe_decode_gemm2", (1, -(-72 // cfg.gemm2.block_n), groups * chunks)),
    ]
    assert cfg.gemm2.split > 1  # 18 programs on 8 "SMs": split


#: (GEMM 1 split, GEMM 2 split) with K = 72 (GEMM 1) and 40 (GEMM 2) in steps of 16: 5 and 3 steps
SPLITS = [(1, 1), (2, 1), (5, 2), (7, 3), (1, 5), (3, 9), (2, 30)]


@needs_triton
@pytest.mark.parametrize(("split1", "split2"), SPLITS)
@pytest.mark.parametrize("case", ["swiglu_oai-alpha-limit-bias", "expert_map", "relu2-bias"])
def test_decode_split_matches_reference(case, split1, split2):
    """Split launches (K chunks in GEMM 1; slot groups and K chunks in GEMM 2, some of them empty)
    give the unsplit result up to float32 summation order, and leave every counter at 0."""
    spec = MoESpec(**{**BASE, **CASES[case][0]})
    T = 3
    weights = random_expert_weights(spec, device=DEVICE, seed=split1 + 7 * split2)
    prepared = moe_plan(spec, DEVICE).prepare(weights)
    gen = torch.Generator(device=DEVICE).manual_seed(split2)
    x = (torch.randn(T, spec.hidden_size, generator=gen, device=DEVICE) * 1.5).to(spec.dtype)
    topk_w = torch.rand(T, spec.top_k, generator=gen, device=DEVICE) + 0.05
    ids = torch.rand(T, spec.num_experts, generator=gen, device=DEVICE).argsort(dim=1)[:, : spec.top_k].int()
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    outs = []
    for s1, s2 in ((1, 1), (split1, split2)):
        cfg = configs.DecodeConfig(
            configs.GemmConfig(8, 16, 4, 1, 1, split=s1), configs.GemmConfig(16, 16, 4, 1, 1, split=s2)
        )
        out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device=DEVICE)
        experts.fused_moe(spec, x, prepared.tensors, topk_w, ids, out, config=cfg)
        outs.append(out)
        err = relative_error(out, want)
        assert err <= tolerance(spec), f"split {(s1, s2)}: relative error {err:.3e} for {spec.describe()}"
    assert relative_error(outs[1], outs[0]) <= 1e-2  # both bf16-rounded: a few ulps apart at most
    assert not experts._split_counters(torch.device(DEVICE), 0).any()


#: (GEMM 1 split, GEMM 2 split) of the chained launch: plain, both split, GEMM 2's slots and K split
CHAIN_SPLITS = [(1, 1), (5, 2), (2, 9)]


def _chained(spec, prepared, cfg, x, topk_w, ids):
    """The decode step's output with ``cfg`` in two launches and in one chained launch, and the latter's launches."""
    outs = []
    for chain in (False, True):
        cfg_c = dataclasses.replace(cfg, chain=chain)
        out = torch.full((x.shape[0], spec.hidden_size), float("nan"), dtype=spec.dtype, device=DEVICE)
        outs.append(experts.fused_moe(spec, x, prepared.tensors, topk_w, ids, out, config=cfg_c))
    launches = experts.decode_launches(
        spec, x, prepared.tensors, topk_w, ids, torch.empty_like(x), dataclasses.replace(cfg, chain=True)
    )
    return outs, [launch[0].__name__ for launch in launches]


@needs_triton
@pytest.mark.parametrize(("split1", "split2"), CHAIN_SPLITS)
@pytest.mark.parametrize(
    ("case", "T"), [("swiglu_oai-alpha-limit-bias", 3), ("expert_map", 2), ("ep", 1), ("k1", 3)]
)
def test_decode_chain_is_bit_equal_to_two_launches(case, T, split1, split2):
    """Both decode GEMMs in one launch (``chain``): the two launches' arithmetic in the same order
    (bit-equal), dropped slots skipped, every counter (split, ticket, ready) 0 again after."""
    spec = MoESpec(**{**BASE, **CASES[case][0]})
    weights = random_expert_weights(spec, device=DEVICE, seed=split1 + 3 * split2)
    prepared = moe_plan(spec, DEVICE).prepare(weights)
    gen = torch.Generator(device=DEVICE).manual_seed(T + split2)
    x = (torch.randn(T, spec.hidden_size, generator=gen, device=DEVICE) * 1.5).to(spec.dtype)
    topk_w = torch.rand(T, spec.top_k, generator=gen, device=DEVICE) + 0.05
    ids = torch.rand(T, spec.num_experts, generator=gen, device=DEVICE).argsort(dim=1)[:, : spec.top_k].int()
    cfg = configs.DecodeConfig(
        configs.GemmConfig(8, 16, 4, 1, 1, split=split1), configs.GemmConfig(16, 16, 2, 1, 1, split=split2)
    )
    (two, one), names = _chained(spec, prepared, cfg, x, topk_w, ids)
    assert names == ["moe_decode_chain"]
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    assert relative_error(one, want) <= tolerance(spec)
    assert torch.equal(one, two)
    assert not experts._split_counters(torch.device(DEVICE), 0).any()


@needs_triton
@pytest.mark.parametrize(
    ("name", "changes"), QUANT_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(QUANT_CASES)]
)
def test_decode_chain_quantized_is_bit_equal(name, changes):
    """Every scheme chained (in-kernel activation quantization, the intermediate's per-row scale
    read after its entry is ready): bit-equal to the two launches; a pre-quantized GEMM keeps
    the separate launches."""
    spec = tq._spec(name, **changes)
    _, weights = tq._weights(spec, seed=8)
    prepared = moe_plan(spec, DEVICE).prepare(weights)
    x, topk_w, ids = tq._inputs(spec, 2, seed=8)
    base = configs.decode_heuristic(spec, 2, 8, False)
    plain = configs.DecodeConfig(
        dataclasses.replace(base.gemm1, prequant=False), dataclasses.replace(base.gemm2, prequant=False)
    )
    (two, one), names = _chained(spec, prepared, plain, x, topk_w, ids)
    assert names == ["moe_decode_chain"]
    assert torch.equal(one, two)
    assert not experts._split_counters(torch.device(DEVICE), 0).any()
    if spec.quant.activation != "none":
        pre = dataclasses.replace(plain, gemm2=dataclasses.replace(plain.gemm2, prequant=True))
        assert _chained(spec, prepared, pre, x, topk_w, ids)[1][-1] == "moe_decode_gemm2"


def test_decode_chain_config_env_and_json(monkeypatch):
    cfg = configs.DecodeConfig(configs.GemmConfig(8, 16, 4, 1, 1), configs.GemmConfig(16, 16, 2, 1, 1))
    assert "chain" not in cfg.to_json() and configs.DecodeConfig.from_json(cfg.to_json()) == cfg
    for prefetch in (True, False):
        chained = dataclasses.replace(cfg, chain=True, prefetch=prefetch)
        assert configs.DecodeConfig.from_json(json.loads(json.dumps(chained.to_json()))) == chained
    spec = MoESpec(**BASE, quant="fp8")
    prepared = moe_plan(spec, DEVICE).prepare(random_expert_weights(spec, device=DEVICE, seed=1))
    x, topk_w, ids = tq._inputs(spec, 2, seed=1)
    for cfg_prefetch, target in ((True, True), (False, True), (True, False)):
        chained = dataclasses.replace(cfg, chain=True, prefetch=cfg_prefetch)
        (launch,) = experts.decode_launches(
            spec, x, prepared.tensors, topk_w, ids, torch.empty_like(x), chained, prefetch=target
        )
        assert launch[3]["PREFETCH"] == (cfg_prefetch and target)
    monkeypatch.setenv("MOE_PORTABLE_DECODE", "1")
    assert not configs.lookup_decode(spec, 1, torch.device("cpu")).chain
    monkeypatch.setenv("MOE_PORTABLE_DECODE_MMA", "1")
    monkeypatch.setenv("MOE_PORTABLE_DECODE_CHAIN", "1")
    got = configs.lookup_decode(spec, 1, torch.device("cpu"))
    assert got.chain and not (got.gemm1.mma or got.gemm2.mma or got.gemm1.prequant or got.gemm2.prequant)
    monkeypatch.setenv("MOE_PORTABLE_DECODE_CHAIN", "0")
    assert not configs.lookup_decode(spec, 1, torch.device("cpu")).chain


def test_gemm2_split_and_decode_split():
    assert configs.gemm2_split(1, 8) == (1, 1)
    assert configs.gemm2_split(5, 8) == (5, 1)
    assert configs.gemm2_split(8, 8) == (8, 1)
    assert configs.gemm2_split(12, 4) == (4, 3)
    assert configs.gemm2_split(10, 4) == (4, 3)
    # 576 programs on 132 SMs: 4 per tile (16 per SM); never more than the steps; big grids: 1
    assert configs.decode_split(576, 14, 132) == 4
    assert configs.decode_split(576, 2, 132) == 2
    assert configs.decode_split(4096, 14, 132) == 1
    assert configs.decode_split(0, 3, 132) == 3


def test_use_decode_rule():
    assert configs.use_decode(1, 8, 8) and configs.use_decode(1, 1, 2)
    assert not configs.use_decode(0, 8, 128) and not configs.use_decode(9, 1, 4096)
    # E=128, k=8 (qwen3): T <= 3; E=256, k=8 (deepseek): T <= 6; E=8, k=2 (mixtral): T == 1
    assert [t for t in range(1, 9) if configs.use_decode(t, 8, 128)] == [1, 2, 3]
    assert [t for t in range(1, 9) if configs.use_decode(t, 8, 256)] == [1, 2, 3, 4, 5, 6]
    assert [t for t in range(1, 9) if configs.use_decode(t, 2, 8)] == [1]


def test_lookup_decode_env_and_table(tmp_path, monkeypatch):
    spec = MoESpec(**BASE)
    cpu = torch.device("cpu")
    assert configs.lookup_decode(spec, 1, cpu) == configs.decode_heuristic(spec, 1, 8, False)
    assert configs.lookup_decode(spec, 8, cpu) is None  # 24 entries on 7 experts: the sorted path
    monkeypatch.setenv("MOE_PORTABLE_DECODE", "1")
    assert configs.lookup_decode(spec, 8, cpu) is not None
    monkeypatch.setenv("MOE_PORTABLE_DECODE", "0")
    assert configs.lookup_decode(spec, 1, cpu) is None
    # a tuned entry's override, on a (faked) GPU
    monkeypatch.delenv("MOE_PORTABLE_DECODE")
    tiles = configs.DecodeConfig(configs.GemmConfig(8, 64, 2, 1, 1), configs.GemmConfig(4, 128, 2, 1, 1))
    sorted_cfg = configs.heuristic_config(spec, 8, 132, False).to_json()
    table = {
        "device": "Fake GPU",
        "configs": {
            configs.layer_key(spec): {
                "1": {**sorted_cfg, "decode": {"use": False}},
                "8": {**sorted_cfg, "decode": {"use": True, **tiles.to_json()}},
            }
        },
    }
    (tmp_path / "Fake_GPU.json").write_text(json.dumps(table))
    monkeypatch.setenv("MOE_PORTABLE_CONFIG_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "_device_facts", lambda index: ("Fake GPU", 132, False, 8))
    configs._load_table.cache_clear()
    try:
        gpu = torch.device("cuda", 0)
        # captured in a CUDA graph: the tuned entry decides
        assert configs.lookup_decode(spec, 1, gpu, capturing=True) is None
        assert configs.lookup_decode(spec, 5, gpu, capturing=True) == tiles
        # eager: the rule (host-bound at these T) or a tuned use, with the entry's tiles where it has them
        assert configs.lookup_decode(spec, 1, gpu) == configs.decode_heuristic(spec, 1, 132, False)
        assert configs.lookup_decode(spec, 5, gpu) == tiles  # the rule says sorted (15 entries, 7 experts)
        monkeypatch.setenv("MOE_PORTABLE_DECODE", "rule")
        assert configs.lookup_decode(spec, 5, gpu) is None
        monkeypatch.delenv("MOE_PORTABLE_DECODE")
        assert configs.MoEConfig.from_json(table["configs"][configs.layer_key(spec)]["8"]).block_m > 0
        # no entry: captured calls keep the sorted path, unless asked for the rule
        monkeypatch.setattr(configs, "_table_entry", lambda *args: None)
        assert configs.lookup_decode(spec, 1, gpu, capturing=True) is None
        assert configs.lookup_decode(spec, 1, gpu) == configs.decode_heuristic(spec, 1, 132, False)
        monkeypatch.setenv("MOE_PORTABLE_DECODE", "rule")
        assert configs.lookup_decode(spec, 1, gpu, capturing=True) == configs.decode_heuristic(
            spec, 1, 132, False
        )
        assert configs.lookup_decode(spec, 8, gpu, capturing=True) is None
        monkeypatch.setenv("MOE_PORTABLE_DECODE", "1")
        assert configs.lookup_decode(spec, 8, gpu, capturing=True) is not None
    finally:
        configs._load_table.cache_clear()


def test_decode_heuristic_takes_the_tensor_core_kernels_on_sm90(monkeypatch):
    from moe_core.presets import get_preset

    bf16 = get_preset("deepseek-v3-tp8").moe_spec()
    block = get_preset("deepseek-v3-tp8").moe_spec(quant="fp8_block")
    channel = get_preset("deepseek-v3-tp8").moe_spec(quant="fp8")
    mx = get_preset("deepseek-v3-tp8").moe_spec(quant="mxfp4")
    mx_a8 = get_preset("deepseek-v3-tp8").moe_spec(quant=experts.QUANT_VARIANTS["mxfp4_w4a8"])
    for spec, tokens in ((bf16, 1), (block, 1), (block, 8), (mx, 1), (mx, 8), (mx_a8, 4)):
        cfg = configs.decode_heuristic(spec, tokens, 132, False, sm90=True)
        base = configs.decode_heuristic(spec, tokens, 132, False)
        for g, plain in ((cfg.gemm1, base.gemm1), (cfg.gemm2, base.gemm2)):
            assert g.mma and g == configs.mma_tile(plain), (spec.quant.name, tokens)
            assert g.block_n % (16 * g.num_warps) == 0 and g.block_k >= 128
    for spec, tokens in ((bf16, 8), (channel, 1), (block, 16), (mx, 16)):  # slower on the H100, or untimed
        cfg = configs.decode_heuristic(spec, tokens, 132, False, sm90=True)
        assert cfg == configs.decode_heuristic(spec, tokens, 132, False), (spec.quant.name, tokens)
    assert not configs.decode_heuristic(bf16, 1, 304, True, sm90=False).gemm1.mma  # AMD: never
    # lookup_decode on a Hopper without a tuned entry passes sm90; on an Ampere it does not
    monkeypatch.setattr(configs, "_table_entry", lambda *args: None)
    gpu = torch.device("cuda", 0)
    for major in (9, 8):
        monkeypatch.setattr(configs, "_device_facts", lambda index, m=major: ("Fake GPU", 132, False, m))
        got = configs.lookup_decode(bf16, 1, gpu)
        assert got == configs.decode_heuristic(bf16, 1, 132, False, sm90=major == 9)
        assert got.gemm1.mma == (major == 9)


def test_captured_untuned_quantized_layers_follow_the_rule(monkeypatch):
    """No tuned entry: a captured call of a quantized layer takes the decode path where the rule
    says (an unquantized one keeps the sorted path); with an entry, the entry decides."""

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(configs, "_device_facts", lambda index: ("Fake GPU", 132, False, 8))
    monkeypatch.setattr(configs, "_table_entry", lambda *args: None)
    for name in ("fp8_block", "fp8-channel-token", "mxfp4-w4a16"):
        spec = tq._spec(name)
        assert configs.lookup_decode(spec, 1, gpu, capturing=True) == configs.decode_heuristic(
            spec, 1, 132, False
        )
        many = next(t for t in range(2, 64) if not configs.use_decode(t, spec.top_k, spec.num_experts))
        assert configs.lookup_decode(spec, many, gpu, capturing=True) is None, name
    assert configs.lookup_decode(MoESpec(**BASE), 1, gpu, capturing=True) is None
    sorted_only = configs.heuristic_config(tq._spec("fp8_block"), 1, 132, False).to_json()
    monkeypatch.setattr(configs, "_table_entry", lambda *args: sorted_only)  # tuned: no "decode" use
    assert configs.lookup_decode(tq._spec("fp8_block"), 1, gpu, capturing=True) is None


def test_sm90_mxfp4_takes_the_decode_path_up_to_a_larger_reread(monkeypatch):
    """On sm_90, untuned mxfp4 layers take the (tensor-core) decode path at T = 8 where the slots
    reread up to DECODE_MXFP4_MMA_REREAD of the distinct experts (deepseek-v3-tp8, gpt-oss-120b),
    not beyond (qwen3-30b-a3b); fp8 layers and other GPUs keep DECODE_MAX_REREAD; the tensor-core
    tiles pre-quantize fp8 activations (W4A8) at every T."""
    from moe_core.presets import get_preset

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(configs, "_table_entry", lambda *args: None)
    w4a8 = experts.QUANT_VARIANTS["mxfp4_w4a8"]
    for major in (9, 8):
        monkeypatch.setattr(configs, "_device_facts", lambda index, m=major: ("Fake GPU", 132, False, m))
        for model, decode_on_sm90 in (
            ("deepseek-v3-tp8", True),
            ("gpt-oss-120b", True),
            ("qwen3-30b-a3b", False),
        ):
            for quant in ("mxfp4", w4a8):
                spec = get_preset(model).moe_spec(quant=quant)
                got = configs.lookup_decode(spec, 8, gpu, capturing=True)
                assert (got is not None) == (decode_on_sm90 and major == 9), (model, major)
            fp8 = get_preset(model).moe_spec(quant="fp8")
            assert configs.lookup_decode(fp8, 8, gpu, capturing=True) is None, model
    spec = get_preset("deepseek-v3-tp8").moe_spec(quant=w4a8)
    for tokens in (1, 8):
        cfg = configs.decode_heuristic(spec, tokens, 132, False, sm90=True)
        assert cfg.gemm1.mma and cfg.gemm1.prequant and cfg.gemm2.prequant, tokens
    assert not configs.decode_heuristic(spec, 1, 132, False).gemm1.prequant  # the Triton GEMV: in-kernel


def test_decode_heuristic_fills_the_gpu():
    from moe_core.presets import get_preset

    spec = get_preset("qwen3-30b-a3b").moe_spec()
    cfg = configs.decode_heuristic(spec, 1, 132, False)
    # T=1: 8 entries x I/bn programs and H/bn programs, each >= 2 per SM unless at the smallest tile
    assert 8 * -(-spec.intermediate_size // cfg.gemm1.block_n) >= 264 or cfg.gemm1.block_n == 4
    assert -(-spec.hidden_size // cfg.gemm2.block_n) >= 264 or cfg.gemm2.block_n == 4
    assert 32 <= cfg.gemm1.block_k <= 512 and 32 <= cfg.gemm2.block_k <= 512
    block = get_preset("deepseek-v3-tp8").moe_spec(quant="fp8_block")
    assert configs.decode_heuristic(block, 1, 132, False).gemm2.block_k == 128


# ----------------------------------------------------------------------------- fast launch


def test_specialization_key_separates_what_triton_specialises():
    key = _launch.specialization_key
    base = torch.empty(64, dtype=torch.bfloat16)
    assert key((base,)) == key((torch.empty(64, dtype=torch.bfloat16),))
    assert key((base,)) != key((base[1:],))  # 2-byte offset: not 16-byte aligned
    assert key((base,)) != key((base.view(torch.float16),))
    assert key((1,)) != key((2,)) and key((16,)) != key((17,)) and key((32,)) == key((48,))
    assert key((2**31,)) != key((2**31 - 16,)) and key((2**63,)) != key((2**62,))
    assert key((-(2**40),)) == key((-(2**41),)) != key((2**64,))  # i64 vs u64, as Triton types them
    assert key((1.0,)) == key((2.5,)) and key((None,)) != key((0,)) and key((True,)) != key((False,))
    assert key(("text",)) is None  # unknown argument types take the normal launch


def test_run_launch_takes_the_normal_launch_when_it_must(monkeypatch):
    calls = []

    class Kernel:  # not a JITFunction (the interpreter's kernels are not either)
        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((grid, args, kwargs))

    before = _launch.fast_launch_stats()["slow"]
    _launch.run_launch(Kernel(), (3,), (1, 2), {"BLOCK": 4})
    monkeypatch.setenv(_launch.FAST_LAUNCH_ENV, "0")
    _launch.run_launch(Kernel(), (1, 2), (), {})
    assert calls == [((3,), (1, 2), {"BLOCK": 4}), ((1, 2), (), {})]
    assert _launch.fast_launch_stats()["slow"] == before + 2


# ----------------------------------------------------------------------------- GPU

GPU_CASES = [
    ("qwen3-30b-a3b", torch.bfloat16, None, None),
    ("deepseek-v3-tp8", torch.bfloat16, None, None),
    ("gpt-oss-20b", torch.bfloat16, None, None),
    ("mixtral-8x7b", torch.float16, None, None),
    ("qwen3-30b-a3b", torch.bfloat16, 4, None),  # expert parallel, rank 1 of 4
    ("deepseek-v3-tp8", torch.bfloat16, None, "fp8_block"),
    ("qwen3-30b-a3b", torch.bfloat16, None, "fp8"),
    ("gpt-oss-20b", torch.bfloat16, None, "mxfp4"),
]


def _assert_replays_match_eager(run, x: torch.Tensor, out: torch.Tensor) -> None:
    """``run(out)`` captured in a CUDA graph, replayed 3 times on new ``x`` (overwritten) into a
    poisoned output: equal to the eager ``run`` each time (the launches' counters reset)."""
    static = torch.empty_like(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(static)
    for i in range(3):
        x.copy_(torch.randn_like(x))
        static.fill_(float("nan"))
        graph.replay()
        assert torch.equal(static, run(torch.empty_like(out))), f"replay {i}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("quant", [None, "fp8", "mxfp4", "fp8_block"])
@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize(("split1", "split2"), [(4, 5), (14, 18), (3, 1)])
def test_gpu_decode_split_real_shapes(quant, T, split1, split2):
    """Split decode launches on deepseek-v3-tp8 (GEMM 1: 14 K steps of 512; GEMM 2: 9 slots, some
    split in K): the reference; bit-equal run to run (the partials are summed in split order);
    a CUDA graph replayed 3 times equals the eager call each time (the counters reset)."""
    from moe_core.presets import get_preset
    from moe_core.testing import random_routing

    preset = get_preset("deepseek-v3-tp8")
    spec = preset.moe_spec(torch.bfloat16, experts.QUANT_VARIANTS.get(quant, quant))
    weights = random_expert_weights(spec, device="cuda", seed=T + split1)
    prepared = moe_plan(spec, "cuda").prepare(weights)
    x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
    topk_w, topk_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
    base = configs.decode_heuristic(spec, T, 132, False)
    cfg = configs.DecodeConfig(
        dataclasses.replace(base.gemm1, split=split1), dataclasses.replace(base.gemm2, split=split2)
    )

    def run(out):
        return experts.fused_moe(spec, x, prepared.tensors, topk_w, topk_ids, out, config=cfg)

    out = run(torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device="cuda"))
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= (tq.bound(spec) if quant else tolerance(spec))
    assert torch.equal(run(torch.empty_like(out)), out)
    _assert_replays_match_eager(run, x, out)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("model", "quant"),
    [
        ("deepseek-v3-tp8", None),
        ("deepseek-v3-tp8", "fp8"),
        ("deepseek-v3-tp8", "fp8_block"),
        ("qwen3-30b-a3b", "fp8_block"),
        ("gpt-oss-20b", "fp8"),
    ],
)
@pytest.mark.parametrize("T", [1, 8])
@pytest.mark.parametrize("prefetch", [True, False])
def test_gpu_decode_chain_real_shapes(model, quant, T, prefetch):
    """The chained decode launch on the GPU (programs really concurrent: GEMM 2's tiles spin on
    GEMM 1's readiness flags) at real shapes, with and without the L2 prefetch: the reference on a
    poisoned output, bit-equal to the two launches of the same tiles, every counter 0 after, and a
    CUDA graph replayed 3 times on new inputs equal to the eager call each time (the counters reset)."""
    from moe_core.presets import get_preset
    from moe_core.testing import random_routing

    preset = get_preset(model)
    spec = preset.moe_spec(torch.bfloat16, experts.QUANT_VARIANTS.get(quant, quant))
    weights = random_expert_weights(spec, device="cuda", seed=T + 2 * prefetch)
    prepared = moe_plan(spec, "cuda").prepare(weights)
    x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
    topk_w, topk_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cfg = configs.decode_heuristic(spec, T, sms, False).chained(prefetch)
    names = [
        launch[0].__name__
        for launch in experts.decode_launches(
            spec, x, prepared.tensors, topk_w, topk_ids, torch.empty_like(x), cfg
        )
    ]
    assert names == ["moe_decode_chain"]

    def run(out, config=cfg):
        return experts.fused_moe(spec, x, prepared.tensors, topk_w, topk_ids, out, config=config)

    out = run(torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device="cuda"))
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= (tq.bound(spec) if quant else tolerance(spec))
    assert torch.equal(run(torch.empty_like(out), dataclasses.replace(cfg, chain=False)), out)
    assert not experts._split_counters(torch.device("cuda"), 0).any()
    _assert_replays_match_eager(run, x, out)
    assert not experts._split_counters(torch.device("cuda"), 0).any()


#: CASES and the quantized cases the tensor-core kernels take, on the GPU at the CPU tests' odd shapes
MMA_CASES = [
    *[(case, None) for case in sorted(CASES)],
    *[(name, changes) for name, changes in QUANT_CASES if not name.startswith("fp8_block-32")],
]


def _check_mma_case(case, changes, T: int, device: str) -> None:
    """The tensor-core decode kernels on ``case`` (poisoned outputs) against the reference and
    against the Triton decode kernels, with the mma configs ``MMA1``/``MMA2`` (split K, slot groups,
    rows past the end, K not a multiple of the step; fp8 and W4A8 pre-quantized)."""
    if changes is None:
        spec = MoESpec(**{**BASE, **CASES[case][0]})
        weights = random_expert_weights(spec, device=device, seed=T)
        gen = torch.Generator(device=device).manual_seed(T)
        x = (torch.randn(T, spec.hidden_size, generator=gen, device=device) * 1.5).to(spec.dtype)
        topk_w = torch.rand(T, spec.top_k, generator=gen, device=device) + 0.05
        ids = (
            torch.rand(T, spec.num_experts, generator=gen, device=device)
            .argsort(dim=1)[:, : spec.top_k]
            .int()
        )
        bound = tolerance(spec)
    else:
        spec = tq._spec(case, **changes)
        weights = tq._weights(spec, seed=T)[1]
        x, topk_w, ids = tq._inputs(spec, T, seed=T)
        bound = tq.bound(spec)
    prepared = moe_plan(spec, device).prepare(weights)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    pre = spec.quant.activation != "none"
    step = 128 if spec.quant.name == "mxfp4" else (64 if pre else 32)
    cfg = configs.DecodeConfig(
        dataclasses.replace(MMA1, block_k=max(64, step), prequant=pre),
        dataclasses.replace(MMA2, block_k=step, prequant=pre),
    )
    names = [
        launch[0].__name__
        for launch in experts.decode_launches(spec, x, prepared.tensors, topk_w, ids, x.clone(), cfg)
    ]
    assert "moe_decode_mma_gemm1" in names and "moe_decode_mma_gemm2" in names, names
    plain = configs.DecodeConfig(
        dataclasses.replace(cfg.gemm1, mma=False), dataclasses.replace(cfg.gemm2, mma=False)
    )
    outs = []
    for c in (cfg, plain):
        out = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device=device)
        outs.append(experts.fused_moe(spec, x, prepared.tensors, topk_w, ids, out, config=c))
        err = relative_error(out, want)
        assert err <= bound, f"{c}: relative error {err:.3e} > {bound:.1e} for {spec.describe()}"
    assert relative_error(outs[0], outs[1]) <= 2 * bound
    assert not experts._split_counters(torch.device(device), 0).any()


@needs_triton
@pytest.mark.skipif(
    HAS_GPU, reason="the GPU runs the compiled kernels (test_gpu_decode_mma_matches_reference)"
)
@pytest.mark.parametrize(
    ("case", "changes"), MMA_CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(MMA_CASES)]
)
def test_decode_mma_kernels_interpreted(case, changes, monkeypatch):
    """The Gluon tensor-core kernels' own source run by Triton's interpreter on the CPU
    (:mod:`tests.gluon_interpreter`: layouts dropped, the mxfp4 PTX emulated), T = 3."""
    from moe_plugin_portable._details import _decode_mma

    from ..gluon_interpreter import interpret

    monkeypatch.setattr(experts, "_mma_capable", lambda device: True)
    monkeypatch.setattr(experts, "_mma_kernels", lambda: interpret(_decode_mma))
    experts._decode_kwargs.cache_clear()  # (it holds the kernel objects)
    try:
        _check_mma_case(case, changes, 3, "cpu")
    finally:
        experts._decode_kwargs.cache_clear()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("case", "changes"), MMA_CASES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(MMA_CASES)]
)
@pytest.mark.parametrize("T", [1, 5])
def test_gpu_decode_mma_matches_reference(case, changes, T):
    """The compiled tensor-core decode kernels at odd shapes, every activation, EP, biases, the fp8
    and mxfp4 schemes (:func:`_check_mma_case`)."""
    _check_mma_case(case, changes, T, "cuda")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("model", "quant"),
    [
        ("deepseek-v3-tp8", None),
        ("deepseek-v3-tp8", "fp8_block"),
        ("qwen3-30b-a3b", "fp8"),
        ("gpt-oss-120b", None),
        ("gpt-oss-120b", "mxfp4"),
        ("deepseek-v3-tp8", "mxfp4_w4a8"),
    ],
)
@pytest.mark.parametrize("T", [1, 8])
def test_gpu_decode_mma_real_shapes(model, quant, T):
    """The tensor-core decode kernels at real shapes: the reference, run-to-run bit equality, and a
    CUDA graph of them replayed equal to eager."""
    from moe_core.presets import get_preset
    from moe_core.testing import random_routing

    preset = get_preset(model)
    spec = preset.moe_spec(torch.bfloat16, experts.QUANT_VARIANTS.get(quant))
    pre = spec.quant.activation != "none"
    weights = random_expert_weights(spec, device="cuda", seed=T)
    prepared = moe_plan(spec, "cuda").prepare(weights)
    x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
    topk_w, topk_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
    g = configs.GemmConfig(64, 128, 4, 2, 1, split=4, prequant=pre, mma=True)
    cfg = configs.DecodeConfig(g, dataclasses.replace(g, split=max(1, spec.top_k // 2)))

    def run(out):
        return experts.fused_moe(spec, x, prepared.tensors, topk_w, topk_ids, out, config=cfg)

    nan = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device="cuda")
    out = run(nan.clone())
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= (tq.bound(spec) if quant else tolerance(spec))
    assert torch.equal(run(nan.clone()), out)
    static = nan.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(static)
    x.copy_(torch.randn_like(x))
    static.fill_(float("nan"))
    graph.replay()
    assert torch.equal(static, run(nan.clone()))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(
    ("model", "quant"),
    [("deepseek-v3-tp8", "fp8_block"), ("qwen3-30b-a3b", "fp8"), ("gpt-oss-120b", "mxfp4_w4a8")],
)
@pytest.mark.parametrize("T", [1, 8])
def test_gpu_decode_prequant_real_shapes(model, quant, T):
    """Pre-quantized decode GEMMs at real shapes: bit-equal to quantizing in every program, within
    the scheme's bound, and a CUDA graph of them replays equal to eager."""
    from moe_core.presets import get_preset
    from moe_core.testing import random_routing

    preset = get_preset(model)
    spec = preset.moe_spec(torch.bfloat16, experts.QUANT_VARIANTS[quant])
    weights = random_expert_weights(spec, device="cuda", seed=T)
    prepared = moe_plan(spec, "cuda").prepare(weights)
    x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
    topk_w, topk_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
    base = configs.decode_heuristic(spec, T, 132, False)

    def run(out, pre):
        cfg = configs.DecodeConfig(
            dataclasses.replace(base.gemm1, prequant=pre), dataclasses.replace(base.gemm2, prequant=pre)
        )
        return experts.fused_moe(spec, x, prepared.tensors, topk_w, topk_ids, out, config=cfg)

    nan = torch.full((T, spec.hidden_size), float("nan"), dtype=spec.dtype, device="cuda")
    out = run(nan.clone(), True)
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= tq.bound(spec)
    assert torch.equal(out, run(nan.clone(), False))
    static = nan.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run(static, True)
    x.copy_(torch.randn_like(x))
    static.fill_(float("nan"))
    graph.replay()
    assert torch.equal(static, run(nan.clone(), True))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize(("model", "dtype", "ep", "quant"), GPU_CASES)
@pytest.mark.parametrize("T", [1, 4, 8])
def test_gpu_decode_real_shapes(model, dtype, ep, quant, T, monkeypatch):
    """The decode path (forced) at real shapes: reference, no host sync, graph replay == eager,
    and the fast launch checked against Triton's own kernel choice."""
    from moe_core.presets import get_preset
    from moe_core.testing import random_routing

    monkeypatch.setenv("MOE_PORTABLE_DECODE", "1")
    monkeypatch.setenv(_launch.FAST_LAUNCH_ENV, "check")
    preset = get_preset(model)
    spec = preset.moe_spec(dtype, experts.QUANT_VARIANTS.get(quant), ep_size=ep or 1, ep_rank=1 if ep else 0)
    plan = moe_plan(spec, "cuda")
    weights = random_expert_weights(spec, device="cuda", seed=T)
    prepared = plan.prepare(weights)
    x = torch.randn(T, spec.hidden_size, device="cuda").to(dtype)
    topk_w, topk_ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
    out = torch.full((T, spec.hidden_size), float("nan"), dtype=dtype, device="cuda")
    moe_apply(plan, x, prepared, topk_w, topk_ids, out=out)
    out.fill_(float("nan"))
    with no_host_sync():
        moe_apply(plan, x, prepared, topk_w, topk_ids, out=out)  # a cache hit, checked
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert relative_error(out, want) <= tolerance(spec)
    monkeypatch.setenv(_launch.FAST_LAUNCH_ENV, "1")
    assert torch.equal(moe_apply(plan, x, prepared, topk_w, topk_ids), out)  # the fast launch: same bits
    assert_graph_replay_matches_eager(plan, prepared, preset, x, topk_w, topk_ids, seed=T + 100)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("path", ["0", "1"])
def test_gpu_fast_launch_follows_specialization(path, monkeypatch):
    """Misaligned inputs and token counts that change Triton's specialization (1, multiples of
    16, others) never reuse a kernel compiled for other arguments (``check`` asserts it)."""
    from moe_core.presets import get_preset
    from moe_core.testing import random_routing

    monkeypatch.setenv("MOE_PORTABLE_DECODE", path)
    monkeypatch.setenv(_launch.FAST_LAUNCH_ENV, "check")
    preset = get_preset("qwen3-30b-a3b")
    spec = preset.moe_spec(torch.bfloat16)
    plan = moe_plan(spec, "cuda")
    weights = random_expert_weights(spec, device="cuda", seed=0)
    prepared = plan.prepare(weights)
    H = spec.hidden_size
    for T in (1, 2, 16, 3, 1, 16):
        for offset in (0, 1):  # 1: x starts 2 bytes into its buffer (not 16-byte aligned)
            x = torch.randn(T * H + offset, device="cuda").to(spec.dtype)[offset:].view(T, H)
            w, ids = random_routing(preset.routing, T, preset.num_experts, device="cuda", seed=T)
            out = moe_apply(plan, x, prepared, w, ids)
            want = fused_experts_reference(spec, x, weights, w, ids, compute_dtype=torch.float64)
            assert relative_error(out, want) <= tolerance(spec), (T, offset)
    assert _launch.fast_launch_stats()["checked"] > 0


class _Param:
    def __init__(self, name: str, constexpr: bool):
        self.name, self.is_constexpr = name, constexpr


class _Compiled:
    """Stands for a CompiledKernel: ``run`` records the launcher calls."""

    def __init__(self, calls: list):
        self.function, self.packed_metadata = "fn", "meta"
        self.run = lambda *a: calls.append(("fast", a))


class _FakeJIT:
    """Stands for a JITFunction ``k(x_ptr, n, BLOCK: constexpr, ACT: constexpr)``: ``[grid](...)``
    is the normal launch, compiling one kernel per (n == 1, n % 16 == 0, kwargs)."""

    def __init__(self):
        self.arg_names = ["x_ptr", "n", "BLOCK", "ACT"]
        self.params = [_Param("x_ptr", False), _Param("n", False), _Param("BLOCK", True), _Param("ACT", True)]
        self.pre_run_hooks: list = []
        self.calls: list = []
        self.kernels: dict = {}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(("normal", grid, args, kwargs))
            key = (args[1] == 1, args[1] % 16 == 0, tuple(kwargs.items()))
            return self.kernels.setdefault(key, _Compiled(self.calls))

        return launch


class _Knobs:
    class runtime:
        launch_enter_hook = None
        launch_exit_hook = None
        debug = False
        add_stages_inspection_hook = None

    class compilation:
        instrumentation_mode = ""


def test_fast_launch_caches_per_specialization(monkeypatch):
    """The launcher gets what JITFunction.run would pass (grid padded to 3, the stream, every
    parameter in order with the constexprs last); another specialization launches normally."""
    monkeypatch.setenv(_launch.FAST_LAUNCH_ENV, "1")  # the default; set against an inherited 0
    monkeypatch.setattr(_launch, "_RUNTIME", [_FakeJIT, _Knobs, lambda: 0, lambda dev: 77, False])
    _launch.clear_cache()
    kernel = _FakeJIT()
    x = torch.empty(64, dtype=torch.bfloat16)
    kw = {"BLOCK": 32, "ACT": 1, "num_warps": 4}
    try:
        _launch.run_launch(kernel, (5,), (x, 40), kw)  # compiles: normal launch
        _launch.run_launch(kernel, (6, 2), (x, 40), kw)  # cached
        assert [c[0] for c in kernel.calls] == ["normal", "fast"]
        assert kernel.calls[1][1] == (6, 2, 1, 77, "fn", "meta", None, None, None, x, 40, 32, 1)
        for args, kwargs in (((x, 1), kw), ((x, 48), kw), ((x[1:], 40), kw), ((x, 40), {**kw, "ACT": 2})):
            kernel.calls.clear()
            _launch.run_launch(kernel, (1,), args, kwargs)  # a new specialization: normal
            assert [c[0] for c in kernel.calls] == ["normal"], (args[1], kwargs)
        kernel.calls.clear()
        _launch.run_launch(kernel, (1,), (x, 56), kw)  # 56: same specialization as 40 (not 1, not %16)
        assert [c[0] for c in kernel.calls] == ["fast"]
        # check mode: the normal launch, and Triton's kernel must be the cached one
        monkeypatch.setenv(_launch.FAST_LAUNCH_ENV, "check")
        kernel.calls.clear()
        _launch.run_launch(kernel, (1,), (x, 40), kw)
        assert [c[0] for c in kernel.calls] == ["normal"]
        kernel.kernels.clear()  # Triton would now pick another kernel: check mode catches it
        with pytest.raises(AssertionError, match="another kernel"):
            _launch.run_launch(kernel, (1,), (x, 40), kw)
        monkeypatch.setenv(_launch.FAST_LAUNCH_ENV, "1")
        # an active launch hook needs launch_metadata: normal launch
        monkeypatch.setattr(_Knobs.runtime, "launch_enter_hook", lambda meta: None)
        kernel.calls.clear()
        _launch.run_launch(kernel, (1,), (x, 40), kw)
        assert [c[0] for c in kernel.calls] == ["normal"]
    finally:
        _launch.clear_cache()


def test_fast_launch_refuses_unexpected_signatures(monkeypatch):
    """A constexpr passed positionally (or one left to its default) cannot be replayed: slow forever."""
    monkeypatch.setenv(_launch.FAST_LAUNCH_ENV, "1")  # the default; set against an inherited 0
    monkeypatch.setattr(_launch, "_RUNTIME", [_FakeJIT, _Knobs, lambda: 0, lambda dev: 77, False])
    _launch.clear_cache()
    kernel = _FakeJIT()
    x = torch.empty(64, dtype=torch.bfloat16)
    try:
        for _ in range(2):
            _launch.run_launch(kernel, (1,), (x, 40), {"BLOCK": 32})  # ACT missing
        assert [c[0] for c in kernel.calls] == ["normal", "normal"]
    finally:
        _launch.clear_cache()


@needs_triton
def test_tuner_tunes_the_decode_path(tmp_path, monkeypatch):
    """At T <= DECODE_MAX_TOKENS the tuner times the decode path too and records whether it beats
    the sorted one, in the entry lookup_decode reads (the small space: the heuristic's tiles)."""
    from moe_plugin_portable import tuning

    monkeypatch.setenv("MOE_PORTABLE_TUNE_CHAIN", "1")

    spec = MoESpec(**BASE)
    found = tuning.tune_layer(spec, DEVICE, tokens=(1, 8, 9), space="small")
    assert isinstance(found["8"]["decode"]["use"], bool) and "decode" not in found["32"]
    decode = found["1"]["decode"]
    assert isinstance(decode["use"], bool) and decode["timing"]["total_us"] > 0
    cfg = configs.DecodeConfig.from_json(decode)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEVICE == "cuda" else 8
    assert dataclasses.replace(cfg, chain=False) == configs.decode_heuristic(spec, 1, sms, False)
    assert decode["timing"]["step_us"] > 0  # the two launches, timed as one step
    timing = decode["timing"]  # (wall-clock timing on the CPU: either may win)
    assert (timing["chain_us"] < timing["step_us"]) == cfg.chain
    assert timing["total_us"] == (
        timing["chain_us"] if cfg.chain else timing["gemm1_us"] + timing["gemm2_us"]
    )
    path = tuning.write_table("Fake GPU", {configs.layer_key(spec): found}, tmp_path, "3.x")
    entry = json.loads(path.read_text())["configs"][configs.layer_key(spec)]["1"]
    assert configs.DecodeConfig.from_json(entry["decode"]) == cfg
    assert configs.MoEConfig.from_json(entry).block_m == found["1"]["block_m"]
    rounds = tuning.decode_space(cfg.gemm1, "quick")
    base = cfg.gemm1
    wide = sum(n > base.block_n for n in (4, 8, 16)) * len({2, 4, 8} - {base.split})
    # the tiles at the base split, the wider ones at splits 2, 4, 8; then splits, then pipelines
    assert [len(r) for r in rounds] == [9 + wide, 4, 9]
    assert all(c.split == base.split or c.block_n > base.block_n for c in rounds[0])


@needs_triton
@pytest.mark.parametrize("chain_faster", [True, False])
def test_tuner_takes_the_chained_launch_where_faster(chain_faster, monkeypatch):
    """After the two GEMMs' tiles, the tuner times their two launches as one step and the chained
    launch (of the tuned and of the heuristic's tiles) and keeps the faster; the chain's time is
    then the step's. Tried only with ``MOE_PORTABLE_TUNE_CHAIN=1`` (opt-in until timed on a GPU),
    never with ``MOE_PORTABLE_DECODE_CHAIN=0``."""
    from moe_plugin_portable import tuning

    spec = MoESpec(**BASE)
    device = torch.device(DEVICE)
    tensors = moe_plan(spec, DEVICE).prepare(random_expert_weights(spec, device=DEVICE, seed=2)).tensors
    names: list[str] = []
    real = tuning.run_launch

    def recording(kernel, *rest):
        names.append(kernel.__name__)
        return real(kernel, *rest)

    def timer(fn):  # the chained launch 1 or 3 us, anything else 2
        names.clear()
        fn()
        return (1.0 if chain_faster else 3.0) if "moe_decode_chain" in names else 2.0

    monkeypatch.setattr(tuning, "run_launch", recording)
    monkeypatch.setenv("MOE_PORTABLE_TUNE_CHAIN", "1")
    inputs = [tuning._inputs(spec, 2, device, routing=r) for r in range(2)]
    cfg, parts = tuning._time_decode(spec, tensors, 2, inputs, device, tuning._Search(timer), "small")
    assert parts["step_us"] == 2.0 and cfg.chain == chain_faster
    assert parts["chain_us"] == (1.0 if chain_faster else 3.0)
    assert parts["total_us"] == (1.0 if chain_faster else 4.0)  # the chain, else GEMM 1 + GEMM 2
    assert not (cfg.gemm1.mma or cfg.gemm2.mma or cfg.gemm1.prequant or cfg.gemm2.prequant) or not cfg.chain
    for env, value in (("MOE_PORTABLE_DECODE_CHAIN", "0"), ("MOE_PORTABLE_TUNE_CHAIN", "0")):
        monkeypatch.setenv(env, value)
        cfg, parts = tuning._time_decode(spec, tensors, 2, inputs, device, tuning._Search(timer), "small")
        assert not cfg.chain and "step_us" not in parts and "chain_us" not in parts


def test_fast_launch_falls_back_when_the_launcher_rejects_its_arguments(monkeypatch):
    monkeypatch.setenv(_launch.FAST_LAUNCH_ENV, "1")  # the default; set against an inherited 0
    monkeypatch.setattr(_launch, "_RUNTIME", [_FakeJIT, _Knobs, lambda: 0, lambda dev: 77, False])
    _launch.clear_cache()
    kernel = _FakeJIT()
    x = torch.empty(64, dtype=torch.bfloat16)
    kw = {"BLOCK": 32, "ACT": 1}
    try:
        _launch.run_launch(kernel, (1,), (x, 40), kw)

        def reject(*args):
            raise TypeError("function takes exactly 14 arguments")

        for key, entry in list(_launch._CACHE.items()):
            _launch._CACHE[key] = (reject, *entry[1:])
        kernel.calls.clear()
        for _ in range(2):
            _launch.run_launch(kernel, (1,), (x, 40), kw)
        assert [c[0] for c in kernel.calls] == ["normal", "normal"]  # and never the fast path again
    finally:
        _launch.clear_cache()
