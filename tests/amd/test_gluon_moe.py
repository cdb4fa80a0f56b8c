"""``amd.gluon.mxfp4``: registration, planning on a (simulated) gfx950, refusals, the block table, launches.

Nothing here launches a Gluon kernel (there is no AMD GPU): the numerics are test_emulation's,
the compiled code is test_profile's.
"""

from __future__ import annotations

import pytest
import torch

import moe_core as moe
from moe_core import DeviceInfo, MoESpec, QuantScheme
from moe_core.cli import main
from moe_core.presets import PRESETS
from moe_core.sorting import SortedTokens, max_num_blocks, max_padded_len
from moe_plugin_amd import gluon_moe
from moe_plugin_amd.gluon_configs import BUCKETS, select_config
from moe_plugin_amd.gluon_layout import PAD

GFX950 = DeviceInfo.parse("gfx950")
W4A8 = QuantScheme("mxfp4", activation="fp8_per_tensor")


def _gpt_oss(name="gpt-oss-120b", **changes) -> MoESpec:
    p = PRESETS[name]
    spec = MoESpec(
        num_experts=p.num_experts, top_k=p.routing.top_k, hidden_size=p.hidden_size,
        intermediate_size=p.intermediate_size, activation=p.activation, has_bias=p.has_bias,
        quant="mxfp4", dtype=torch.bfloat16,
    )  # fmt: skip
    return spec.replace(**changes) if changes else spec


@pytest.mark.parametrize("quant", ["mxfp4", W4A8])
def test_plans_on_gfx950(quant):
    plan = moe.moe_plan(_gpt_oss(quant=quant), GFX950)
    assert plan.kernel == "amd.gluon.mxfp4"
    text = plan.explain()
    assert "portable.triton.fused_moe" in text and "amd.aiter.fused_moe" in text


def test_cli_plan(capsys):
    assert main(["plan", "--device", "gfx950", "--model", "gpt-oss-120b", "--quant", "mxfp4"]) == 0
    out = capsys.readouterr().out
    assert "chosen: amd.gluon.mxfp4" in out and "refused" in out


@pytest.mark.parametrize("device", ["cpu", "sm_90", "gfx942"])
def test_capability_refuses_elsewhere(device):
    plan = moe.moe_plan(_gpt_oss(), DeviceInfo.parse(device))
    assert plan.kernel != "amd.gluon.mxfp4"
    assert "amd.gluon.mxfp4" in plan.explain() and "gfx950" in plan.explain()


def test_apply_never_called_off_hip(monkeypatch):
    """Off gfx950 the Gluon kernel is never chosen, even when forced, so its apply (a launch) never runs."""

    def boom(*args, **kwargs):
        raise AssertionError("amd.gluon.mxfp4 apply called on a non-hip device")

    monkeypatch.setattr(gluon_moe, "_apply", boom)  # before the first plan registers the kernels
    spec = _gpt_oss(num_experts=8, top_k=2, hidden_size=128, intermediate_size=96)
    with pytest.raises(moe.UnsupportedError, match=r"amd\.gluon\.mxfp4"):
        moe.moe_plan(spec, "cpu", backend="amd.gluon.mxfp4")
    plan = moe.moe_plan(spec, "cpu")
    assert plan.kernel != "amd.gluon.mxfp4"
    assert moe.moe_plan(spec, GFX950).entry.apply is boom  # the patched apply is the registered one
    g = torch.Generator().manual_seed(0)
    w = moe.ExpertWeights(
        w13=torch.randn(8, 192, 128, generator=g),
        w2=torch.randn(8, 128, 96, generator=g),
        b13=torch.zeros(8, 192),
        b2=torch.zeros(8, 128),
    )
    prepared = plan.prepare(w)
    ids = torch.tensor([[0, 3], [5, 1]], dtype=torch.int32)
    out = moe.moe_apply(plan, torch.randn(2, 128).bfloat16(), prepared, torch.full((2, 2), 0.5), ids)
    assert out.shape == (2, 128) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"dtype": torch.float16}, "bf16"),
    ],
)
def test_supports_refusals(changes, words):
    reason = gluon_moe._supports(_gpt_oss(**changes), GFX950)
    assert reason is not None and words in reason


def test_gelu_and_router_weight_on_input_refused():
    plan = moe.moe_plan(_gpt_oss(activation="gelu", swiglu_alpha=None, swiglu_limit=None), GFX950)
    assert plan.kernel != "amd.gluon.mxfp4"
    plan = moe.moe_plan(_gpt_oss(top_k=1, apply_router_weight_on_input=True), GFX950)
    assert plan.kernel != "amd.gluon.mxfp4"


def test_block_table():
    seen = set()
    for limit, cfg in BUCKETS:
        assert cfg.block_m in (16, 32, 64, 128)  # moe_sorting unit sizes
        for g in (cfg.gemm1, cfg.gemm2):
            assert PAD % g.block_n == 0 and g.num_warps % g.warps_m == 0 and g.stages in (1, 2)
            assert cfg.block_m % (16 * g.warps_m) == 0 and g.block_n % (16 * (g.num_warps // g.warps_m)) == 0
        assert cfg.block_k(2944) == 128 and cfg.block_k(3072) == 256
        seen.add(limit)
    assert None in seen
    assert (
        select_config(1).block_m == 16 and select_config(16).block_m == 16 and select_config(17).block_m == 32
    )
    assert select_config(10**6) == BUCKETS[-1][1]


@pytest.mark.parametrize("T", [1, 300, 5000])
def test_launches_on_meta(T):
    spec = _gpt_oss()
    k, E, H = spec.top_k, spec.num_experts, spec.hidden_size
    tiles = select_config(T)
    rows = max_padded_len(T * k, E, tiles.block_m)
    meta = {"device": "meta"}
    st = SortedTokens(
        torch.empty(rows, dtype=torch.int32, **meta),
        torch.empty(rows, dtype=torch.float32, **meta),
        torch.empty(max_num_blocks(T * k, E, tiles.block_m), dtype=torch.int32, **meta),
        torch.empty(2, dtype=torch.int32, **meta),
    )
    tensors = {
        n: torch.empty(E, 16, dtype=torch.uint8, **meta) for n in ("w13", "w13_scale", "w2", "w2_scale")
    }
    tensors.update(
        {n: torch.empty(1, dtype=torch.float32, **meta) for n in ("b13", "b2", "a13_scale", "a2_scale")}
    )
    tensors["local_map"] = torch.empty(E, dtype=torch.int32, **meta)
    x = torch.empty(T, H, dtype=torch.bfloat16, **meta)
    out = torch.empty(T, H, dtype=torch.bfloat16, **meta)
    ids = torch.empty(T, k, dtype=torch.int32, **meta)
    (g1, grid1, _, kw1), (g2, grid2, _, kw2), (r, grid3, _, _) = gluon_moe.gluon_launches(
        spec, x, tensors, st, ids, out
    )
    assert g1.__name__ == "moe_gemm1" and g2.__name__ == "moe_gemm2" and r.__name__ == "moe_slot_sum"
    blocks = gluon_moe.active_blocks(T * k, E, tiles.block_m)
    assert grid1 == (2944 // tiles.gemm1.block_n, blocks) and grid2 == (2944 // tiles.gemm2.block_n, blocks)
    assert blocks <= min(T * k, E) + T * k // tiles.block_m
    assert grid3 == (T, -(-H // gluon_moe.SLOT_SUM_BLOCK))
    assert kw1["K_PAD"] == kw2["N_PAD"] == 2944 and kw1["ACTIVATION"] == 1 and kw1["BLOCK_K"] == 128


def test_cli_plans_gluon_for_gpt_oss_on_gfx950(capsys):
    """The issue's command: ``moe plan --device-override hip:gfx950 --model gpt-oss-120b --quant mxfp4``."""
    from moe_core.cli import main

    assert (
        main(["plan", "--device-override", "hip:gfx950", "--model", "gpt-oss-120b", "--quant", "mxfp4"]) == 0
    )
    text = capsys.readouterr().out
    assert "chosen: amd.gluon.mxfp4" in text and "amd:gfx950" in text
    assert "refused:" in text  # the others are explained
