"""``amd.gluon.mxfp4``'s prepared layout: the shuffle's byte positions, padding, expert order, round trip."""

from __future__ import annotations

import pytest
import torch

from moe_core import ExpertWeights, MoEInputError, MoESpec
from moe_core.quant import dequantize_mxfp4, quantize_weights
from moe_plugin_amd import gluon_layout as layout
from moe_plugin_amd.emulation import b_offsets, s_offsets


def _spec(E=5, H=96, inter=160, expert_map=None) -> MoESpec:
    return MoESpec(
        num_experts=E, top_k=2, hidden_size=H, intermediate_size=inter, activation="swiglu_oai",
        has_bias=True, quant="mxfp4", dtype=torch.bfloat16, expert_map=expert_map,
    )  # fmt: skip


def _weights(spec: MoESpec, seed: int = 0) -> ExpertWeights:
    g = torch.Generator().manual_seed(seed)
    L, H, inter = spec.num_local_experts, spec.hidden_size, spec.intermediate_size
    w = ExpertWeights(
        w13=torch.randn(L, 2 * inter, H, generator=g),
        w2=torch.randn(L, H, inter, generator=g),
        b13=torch.randn(L, 2 * inter, generator=g),
        b2=torch.randn(L, H, generator=g),
    )
    return quantize_weights(w, "mxfp4")


def test_shuffle_round_trip_and_lane_order():
    w = torch.randint(0, 256, (3, 48, 192), dtype=torch.uint8)  # N=48, K=384
    flat = layout.shuffle(w)
    assert flat.shape == (3, 48 * 192)
    assert torch.equal(layout.unshuffle(flat, 48, 384), w)
    # lane l of the first chunk (column l % 16, K group l // 16) holds row l % 16, bytes 16*(l//16)..+16
    for lane in (0, 1, 15, 16, 47, 63):
        got = flat[0, lane * 16 : lane * 16 + 16]
        assert torch.equal(got, w[0, lane % 16, 16 * (lane // 16) : 16 * (lane // 16) + 16])
    # the kernel's offsets (emulation.b_offsets == _b_offsets) read the canonical tile back
    for n0, k0 in ((0, 0), (16, 128), (32, 256)):
        tile = flat[1][b_offsets(n0, k0, 384, 16, 128)]  # [BK/2, BN]
        assert torch.equal(tile, w[1, n0 : n0 + 16, k0 // 2 : k0 // 2 + 64].T)


def test_shuffle_refuses_unaligned():
    with pytest.raises(MoEInputError):
        layout.shuffle(torch.zeros(1, 24, 64, dtype=torch.uint8))


def test_scale_offsets():
    s = torch.randint(0, 256, (2, 32, 8), dtype=torch.uint8)  # [E, N, K/32]
    km = layout.shuffle_scale(s)
    assert torch.equal(layout.unshuffle_scale(km), s)
    tile = km[1].reshape(-1)[s_offsets(16, 128, 32, 16, 128)]  # [BN, BK/32]
    assert torch.equal(tile, s[1, 16:32, 4:8])


@pytest.mark.parametrize("expert_map", [None, (2, -1, 0, -1, 1)])
def test_prepare_round_trip(expert_map):
    spec = _spec(expert_map=expert_map)
    w = _weights(spec)
    t = layout.prepare_weights(spec, w)
    HP, IP = 128, 256
    L = spec.num_local_experts
    assert t["w13"].shape == (L, 2 * IP * HP // 2) and t["w13_scale"].shape == (L, HP // 32, 2 * IP)
    assert t["w2"].shape == (L, HP * IP // 2) and t["w2_scale"].shape == (L, IP // 32, HP)
    back = layout.canonical_weights(spec, t)
    for name in ("w13", "w13_scale", "w2", "w2_scale"):
        assert torch.equal(getattr(back, name), getattr(w, name)), name
    assert torch.equal(back.b13, w.b13.float()) and torch.equal(back.b2, w.b2.float())
    # padding dequantizes to zeros
    w13 = dequantize_mxfp4(layout.unshuffle(t["w13"], 2 * IP, HP), layout.unshuffle_scale(t["w13_scale"]))
    assert not w13[:, spec.intermediate_size : IP].any() and not w13[:, :, spec.hidden_size :].any()


def test_expert_order_follows_sorting_numbering():
    """Prepared expert p is the p-th local expert by ascending global id (moe_sorting's mask rank)."""
    spec = _spec(expert_map=(2, -1, 0, -1, 1))
    assert layout.local_order(spec) == [2, 0, 1]
    t = layout.prepare_weights(spec, _weights(spec))
    assert t["local_map"].tolist() == [0, -1, 1, -1, 2]
    w = _weights(spec)
    assert torch.equal(layout.canonical_weights(spec, t).w2[2], w.w2[2])
