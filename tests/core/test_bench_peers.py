"""The bench's ``torch._scaled_grouped_mm`` peer (fp8 rowwise) on the CPU.

Its CUDA kernel needs sm_90, so the op is replaced here by one that first makes torch's own
checks of the call (the real op on ``meta`` copies of the arguments: dtypes, row/column-major
strides, scale shapes, offsets) and then computes each group in float32. The peer's sort,
quantization, scales and scatter are then checked against the float64 reference.
"""

from __future__ import annotations

import sys

import pytest
import torch

from moe_core import MoESpec, QuantScheme
from moe_core.bench import peers
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, relative_error, tolerance

REAL = getattr(torch, "_scaled_grouped_mm", None)
pytestmark = pytest.mark.skipif(REAL is None, reason=f"torch {torch.__version__} has no _scaled_grouped_mm")


def _checked_fake(calls: list):
    def fake(
        a, b, scale_a, scale_b, offs=None, bias=None, scale_result=None, out_dtype=None, use_fast_accum=False
    ):
        meta = [t.to("meta") for t in (a, b, scale_a, scale_b, offs)]
        REAL(*meta[:4], offs=meta[4], out_dtype=out_dtype)  # torch's checks of this call
        calls.append((tuple(a.shape), tuple(b.shape), b.stride()))
        out = torch.empty(a.shape[0], b.shape[2])
        start = 0
        for g, end in enumerate(offs.tolist()):
            out[start:end] = (a[start:end].float() * scale_a[start:end, None]) @ (
                b[g].float() * scale_b[g][None, :]
            )
            start = end
        return out.to(out_dtype)

    return fake


@pytest.mark.parametrize("weight_scale", ["per_channel", "per_tensor"])
@pytest.mark.parametrize("T", [1, 13])
def test_peer_matches_the_reference(weight_scale, T, monkeypatch):
    calls: list = []
    monkeypatch.setattr(torch, "_scaled_grouped_mm", _checked_fake(calls))
    spec = MoESpec(8, 2, 64, 48, quant=QuantScheme("fp8", weight_scale=weight_scale))
    weights = random_expert_weights(spec, seed=T)
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, 64, generator=gen).to(torch.bfloat16)
    topk_w = torch.rand(T, 2, generator=gen)
    ids = torch.rand(T, 8, generator=gen).argsort(dim=1)[:, :2].int()
    out = peers.scaled_grouped_mm_peer().bind(spec, weights)(x, topk_w, ids)
    want = fused_experts_reference(spec, x, weights, topk_w, ids, compute_dtype=torch.float64)
    assert out.dtype == torch.bfloat16 and relative_error(out, want) <= tolerance(spec)
    assert [c[:2] for c in calls] == [((T * 2, 64), (8, 64, 96)), ((T * 2, 48), (8, 48, 64))]


def test_peer_refuses_what_it_cannot_run():
    supports = peers.scaled_grouped_mm_peer().supports
    cpu = torch.device("cpu")
    fp8 = MoESpec(8, 2, 64, 48, quant="fp8")
    assert "sm_90" in supports(fp8, cpu)
    cases = {
        "bf16": MoESpec(8, 2, 64, 48),
        "fp8_block": MoESpec(8, 2, 256, 256, quant="fp8_block"),
        "fp8_per_tensor": MoESpec(8, 2, 64, 48, quant=QuantScheme("fp8", activation="fp8_per_tensor")),
        "float16": MoESpec(8, 2, 64, 48, quant="fp8", dtype=torch.float16),
        "multiples of 16": MoESpec(8, 2, 72, 40, quant="fp8"),
    }
    for needle, spec in cases.items():
        reason = supports(spec, cpu)
        assert reason is not None and needle in reason, (needle, reason)


def test_make_peers_lists_it():
    found, status = peers.make_peers(None)
    assert [p.name for p in found] == ["grouped_mm", "scaled_grouped_mm"]
    assert status["scaled_grouped_mm"]["status"] == "available"


def test_report_compares_each_case_with_its_torch_peer():
    from moe_core.bench.report import _vs_torch

    assert _vs_torch({"speedup_vs_grouped_mm": 1.5}) == 1.5
    assert _vs_torch({"speedup_vs_scaled_grouped_mm": 2.0}) == 2.0
    assert _vs_torch({}) is None


def _fake_vllm(tmp_path, with_fp8: bool):
    """A vLLM peer package whose functions record their calls (``CALLS``)."""
    pkg = tmp_path / ("vllm_fp8" if with_fp8 else "vllm_plain")
    pkg.mkdir()
    text = (
        "CALLS = []\n"
        "def describe():\n    return {'vllm': 'fake'}\n"
        "def fused_moe(x, w1, w2, topk_weights, topk_ids):\n    CALLS.append(('bf16', w1.dtype))\n    return x\n"
    )
    if with_fp8:
        text += (
            "def fused_moe_fp8(x, w1, w2, w1_scale, w2_scale, topk_weights, topk_ids, block_shape):\n"
            "    CALLS.append(('fp8', w1.dtype, tuple(w1_scale.shape), block_shape))\n    return x\n"
        )
    (pkg / "__init__.py").write_text(text)
    return pkg


def test_vllm_peer_takes_fp8_only_through_fused_moe_fp8(tmp_path, monkeypatch):
    gpu = torch.device("cuda")  # (supports only reads the type: nothing runs on it here)
    rowwise = MoESpec(8, 2, 256, 256, quant="fp8")
    block = MoESpec(8, 2, 256, 256, quant="fp8_block")
    static = MoESpec(8, 2, 256, 256, quant=QuantScheme("fp8", activation="fp8_per_tensor"))
    plain = peers.vllm_peer(_fake_vllm(tmp_path, with_fp8=False))
    assert "no fused_moe_fp8" in plain.supports(rowwise, gpu)
    peer = peers.vllm_peer(_fake_vllm(tmp_path, with_fp8=True))
    assert peer.supports(rowwise, gpu) is None and peer.supports(block, gpu) is None
    assert "fp8_per_tensor" in peer.supports(static, gpu)
    assert "needs a GPU" in peer.supports(rowwise, torch.device("cpu"))
    module = sys.modules["moe_bench_vllm_peer"]
    x, w, ids = torch.randn(3, 256), torch.rand(3, 2), torch.zeros(3, 2, dtype=torch.int32)
    for spec in (rowwise, block, MoESpec(8, 2, 256, 256)):
        peer.bind(spec, random_expert_weights(spec, seed=0))(x, w, ids)
    calls = module.CALLS
    assert calls == [
        ("fp8", torch.float8_e4m3fn, (8, 512), None),
        ("fp8", torch.float8_e4m3fn, (8, 4, 2), (128, 128)),
        ("bf16", torch.bfloat16),
    ]
