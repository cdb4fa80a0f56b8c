"""``amd.gluon.mxfp4``'s Gluon kernels, their own source, run by Triton's interpreter on the CPU.

:mod:`tests.gluon_interpreter` binds ``gl`` to ``triton.language`` (layouts dropped; CDNA4's scaled
upcast and scaled MFMA by their OCP values) and runs the plugin's real ``apply``: this plugin's
Triton sorter, then ``moe_gemm1``, ``moe_gemm2`` and ``moe_slot_sum`` program by program, on the
prepared (shuffled) weights, into a NaN-poisoned output. The oracle is the float64 reference on the
same quantized weights; the tile-level emulation (test_emulation.py) must agree with the kernels
to the same bound. What this cannot show: register layouts and the MFMA's own summation order.
"""

from __future__ import annotations

import pytest
import torch

from moe_core.planner import PreparedWeights
from moe_plugin_amd import emulation, gluon_layout, gluon_moe
from moe_plugin_amd.gluon_configs import select_config

from ..gluon_interpreter import interpret
from .helpers import HAS_GPU, needs_triton
from .test_emulation import BOUND, EP_MAP, W4A8, W4A16, H, _case, _error

pytestmark = [
    needs_triton,
    pytest.mark.skipif(HAS_GPU, reason="the interpreter runs these on a CPU"),
]


@pytest.fixture
def interpreted(monkeypatch):
    """The plugin's kernels replaced by their interpreted source for the test."""
    from moe_plugin_amd._details import _gluon_moe

    ns = interpret(_gluon_moe)
    for name in ("moe_gemm1", "moe_gemm2", "moe_slot_sum"):
        monkeypatch.setattr(_gluon_moe, name, getattr(ns, name))


def _apply(spec, weights, x, topk_w, topk_ids, sorted_tokens=None) -> torch.Tensor:
    tensors = gluon_layout.prepare_weights(spec, weights)
    out = torch.full((x.shape[0], H), float("nan"), dtype=torch.bfloat16)
    prepared = PreparedWeights("amd.gluon.mxfp4", tensors, {})
    if sorted_tokens is None:
        gluon_moe._apply(spec, x, prepared, topk_w, topk_ids, out)
    else:
        tiles = select_config(x.shape[0])
        for kernel, grid, args, kwargs in gluon_moe.gluon_launches(
            spec, x, tensors, sorted_tokens, topk_ids, out, tiles
        ):
            kernel[grid](*args, **kwargs)
    return out


CASES = {
    "w4a16-swiglu-T1": dict(T=1),
    "w4a16-swiglu-T33": dict(T=33),
    "w4a16-silu-sparse-T5": dict(T=5, activation="silu", sparse=True, seed=1),
    "w4a8-T1": dict(T=1, quant=W4A8, seed=2),
    "w4a8-T33": dict(T=33, quant=W4A8, seed=2),
    "ep-T5": dict(T=5, expert_map=EP_MAP, seed=3),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernels_match_the_reference_and_the_emulation(name, interpreted):
    spec, weights, x, topk_w, topk_ids, ref = _case(**CASES[name])
    out = _apply(spec, weights, x, topk_w, topk_ids)
    bound = BOUND[spec.quant.activation]
    assert _error(out, ref) < bound, _error(out, ref)  # (NaN, from a row never written: inf)
    emulated = emulation.emulate_moe(spec, x, gluon_layout.prepare_weights(spec, weights), topk_w, topk_ids)
    assert _error(out, emulated.double()) < bound
    if spec.expert_map is not None:  # tokens with no local expert: zeros
        dropped = ~torch.isin(topk_ids, torch.tensor([0, 3, 5], dtype=torch.int32)).any(dim=1)
        assert torch.equal(out[dropped].float(), torch.zeros_like(out[dropped].float()))


@pytest.mark.parametrize("quant", [W4A16, W4A8], ids=["w4a16", "w4a8"])
def test_pipelined_k_loops(quant, interpreted):
    """H = 608 and I = 288 (padded to 768 and 384: three K steps in each GEMM), T = 5 (the
    ``STAGES`` 2 tiles: the next step's tiles loaded before this step's MFMAs)."""
    from moe_core import ExpertWeights, MoESpec
    from moe_core.quant import quantize_weights
    from moe_core.reference import fused_experts_reference

    hidden, inter, T = 608, 288, 5
    assert select_config(T).gemm1.stages == 2 and select_config(T).gemm2.stages == 2
    spec = MoESpec(
        num_experts=5, top_k=2, hidden_size=hidden, intermediate_size=inter, activation="swiglu_oai",
        swiglu_alpha=1.702, swiglu_limit=7.0, has_bias=True, quant=quant, dtype=torch.bfloat16,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(11)
    weights = quantize_weights(
        ExpertWeights(
            w13=torch.randn(5, 2 * inter, hidden, generator=gen) / hidden**0.5,
            w2=torch.randn(5, hidden, inter, generator=gen) / inter**0.5,
            b13=torch.randn(5, 2 * inter, generator=gen) * 0.1,
            b2=torch.randn(5, hidden, generator=gen) * 0.1,
        ),
        quant,
    )
    if quant.static_activation_scale:
        weights.a13_scale, weights.a2_scale = torch.tensor(4.0 / 448), torch.tensor(2.0 / 448)
    x = torch.randn(T, hidden, generator=gen).to(torch.bfloat16)
    topk_ids = torch.rand(T, 5, generator=gen).topk(2, dim=1).indices.to(torch.int32)
    topk_w = torch.softmax(torch.randn(T, 2, generator=gen), dim=1)
    tensors = gluon_layout.prepare_weights(spec, weights)
    out = torch.full((T, hidden), float("nan"), dtype=torch.bfloat16)
    gluon_moe._apply(spec, x, PreparedWeights("amd.gluon.mxfp4", tensors, {}), topk_w, topk_ids, out)
    ref = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert _error(out, ref) < BOUND[quant.activation], _error(out, ref)


def test_a_wrong_remap_fails_the_check(interpreted):
    """The same check, on the kernels' real grid, fails when the blocks' experts are rotated."""
    spec, weights, x, topk_w, topk_ids, ref = _case(33, seed=7)
    tiles = select_config(33)
    st = gluon_moe.sort_tokens(spec, topk_ids, topk_w, tiles, gluon_layout.prepare_weights(spec, weights))
    assert _error(_apply(spec, weights, x, topk_w, topk_ids, st), ref) < BOUND["none"]
    used = int(st.num_valid_ids[0]) // tiles.block_m
    wrong = st.sorted_expert_ids.clone()
    wrong[:used] = torch.roll(wrong[:used], 1)
    bad = _apply(spec, weights, x, topk_w, topk_ids, st._replace(sorted_expert_ids=wrong))
    assert _error(bad, ref) > 10 * BOUND["none"]


def test_interpreted_ops_refuse_what_they_do_not_emulate():
    """The shim's CDNA4 ops emulate what these kernels use; anything else raises, never a guess."""
    import triton.language as tl

    from ..gluon_interpreter import _CDNA4

    with pytest.raises(NotImplementedError):
        _CDNA4.scaled_upcast(None, None, tl.float16, 0)
    with pytest.raises(NotImplementedError):
        _CDNA4.mfma_scaled(None, None, "e5m2", None, None, "e2m1", None)
