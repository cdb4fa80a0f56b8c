"""``amd.gluon.mxfp4`` on a real gfx950 (MI350X/MI355X): never run yet, there is no such GPU here.

Skipped everywhere else. On a gfx950 ROCm machine::

    pytest -q tests/amd/test_gluon_gpu.py

checks, for the small odd shapes of test_emulation and a gpt-oss-20b layer: the launched kernels
against the reference (float64) with the emulation's bound, against the emulation itself (same
roundings, so much closer), no host synchronisation, poisoned allocator.
"""

from __future__ import annotations

import pytest
import torch

import moe_core as moe
from moe_core import ExpertWeights, MoESpec, QuantScheme
from moe_core.device import device_info
from moe_core.quant import quantize_weights
from moe_core.reference import fused_experts_reference
from moe_plugin_amd import emulation, gluon_moe
from moe_plugin_amd.gluon_configs import select_config

from ..gpu_checks import no_host_sync, poison_allocator


def _is_gfx950() -> bool:
    return (
        bool(getattr(torch.version, "hip", None))
        and torch.cuda.is_available()
        and (device_info("cuda").arch == "gfx950")
    )


pytestmark = pytest.mark.skipif(not _is_gfx950(), reason="needs a gfx950 GPU (MI350X/MI355X)")

W4A16 = QuantScheme("mxfp4")
W4A8 = QuantScheme("mxfp4", activation="fp8_per_tensor")


def _case(E, k, H, inter, T, quant, seed=0):
    g = torch.Generator().manual_seed(seed)
    spec = MoESpec(
        num_experts=E, top_k=k, hidden_size=H, intermediate_size=inter, activation="swiglu_oai",
        has_bias=True, quant=quant, dtype=torch.bfloat16,
    )  # fmt: skip
    w = quantize_weights(
        ExpertWeights(
            w13=torch.randn(E, 2 * inter, H, generator=g) / H**0.5,
            w2=torch.randn(E, H, inter, generator=g) / inter**0.5,
            b13=torch.randn(E, 2 * inter, generator=g) * 0.1,
            b2=torch.randn(E, H, generator=g) * 0.1,
        ),
        quant,
    )
    if quant.static_activation_scale:
        w.a13_scale, w.a2_scale = torch.tensor(4.0 / 448), torch.tensor(2.0 / 448)
    x = torch.randn(T, H, generator=g).bfloat16()
    ids = torch.rand(T, E, generator=g).topk(k, dim=1).indices.int()
    tw = torch.softmax(torch.randn(T, k, generator=g), dim=1)
    return spec, w, x, tw, ids


@pytest.mark.parametrize("shape", [(7, 3, 160, 96), (32, 4, 2880, 2880)])
@pytest.mark.parametrize("T", [1, 5, 33, 300])
@pytest.mark.parametrize("quant", [W4A16, W4A8], ids=["w4a16", "w4a8"])
def test_gluon_mxfp4_on_gfx950(shape, T, quant):
    E, k, H, inter = shape
    spec, w, x, tw, ids = _case(E, k, H, inter, T, quant)
    ref = fused_experts_reference(spec, x, w, tw, ids, compute_dtype=torch.float64)
    plan = moe.moe_plan(spec, "cuda")
    assert plan.kernel == "amd.gluon.mxfp4"
    prepared = plan.prepare(w.to("cuda"))
    poison_allocator()
    xd, twd, idsd = x.cuda(), tw.cuda(), ids.cuda()
    moe.moe_apply(plan, xd, prepared, twd, idsd)  # compile outside the sync check
    with no_host_sync():
        out = moe.moe_apply(plan, xd, prepared, twd, idsd)
    out = out.cpu()
    scale = ref.abs().max()
    assert float((out.double() - ref).abs().max() / scale) < 1e-2
    if H > 1024:  # the emulation's Python loops are for small shapes
        return
    tiles = select_config(T)
    st = gluon_moe.sort_tokens(spec, idsd, twd, tiles, prepared.tensors)  # the device's sorter, as apply
    st = type(st)(*(t.cpu() for t in st))
    tensors = {n: t.cpu() for n, t in prepared.tensors.items()}
    emu = emulation.emulate_moe(spec, x, tensors, tw, ids, tiles=tiles, sorted_tokens=st)
    assert float((out.float() - emu.float()).abs().max() / scale) < 4e-3
