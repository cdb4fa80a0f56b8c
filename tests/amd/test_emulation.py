"""``amd.gluon.mxfp4``'s kernels, emulated tile by tile (moe_plugin_amd.emulation), against the reference.

The emulation reads the real prepared (shuffled) weights and the real sorted buffers of this
plugin's Triton moe_sorting (run under the interpreter), on the kernels' grids, block table and
epilogue order; the oracle is moe_core's reference in float64 on the same quantized weights.
Shapes are odd on purpose (H=160 pads to 256, I=96 to 128, E=7, k=3). The mutation tests
corrupt the shuffle, the remap (sorted_expert_ids), the grid bound and the scatter, and show
that the same check then fails.
"""

from __future__ import annotations

import pytest
import torch

from moe_core import ExpertWeights, MoESpec, QuantScheme
from moe_core.quant import quantize_weights
from moe_core.reference import fused_experts_reference
from moe_plugin_amd import emulation, gluon_layout, gluon_moe
from moe_plugin_amd.gluon_configs import select_config

from .helpers import needs_triton

pytestmark = needs_triton

E, K_TOP, H, INTER = 7, 3, 160, 96
_SLOT_ROWS = emulation.slot_rows
W4A16 = QuantScheme("mxfp4")
W4A8 = QuantScheme("mxfp4", activation="fp8_per_tensor")


def _spec(quant=W4A16, activation="swiglu_oai", expert_map=None) -> MoESpec:
    return MoESpec(
        num_experts=E, top_k=K_TOP, hidden_size=H, intermediate_size=INTER, activation=activation,
        has_bias=True, quant=quant, dtype=torch.bfloat16, expert_map=expert_map,
    )  # fmt: skip


def _weights(spec: MoESpec, gen: torch.Generator) -> ExpertWeights:
    L = spec.num_local_experts
    w = ExpertWeights(
        w13=torch.randn(L, 2 * INTER, H, generator=gen) / H**0.5,
        w2=torch.randn(L, H, INTER, generator=gen) / INTER**0.5,
        b13=torch.randn(L, 2 * INTER, generator=gen) * 0.1,
        b2=torch.randn(L, H, generator=gen) * 0.1,
    )
    w = quantize_weights(w, spec.quant)
    if spec.quant.static_activation_scale:
        w.a13_scale = torch.tensor(4.0 / 448)
        w.a2_scale = torch.tensor(2.0 / 448)
    return w


def _routing(T: int, gen: torch.Generator, sparse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.rand(T, E, generator=gen)
    if sparse:  # every token routes to experts {1, 4, 6} only: the other 4 experts get no block
        scores[:, [1, 4, 6]] += 2.0
    ids = scores.topk(K_TOP, dim=1).indices.to(torch.int32)
    weights = torch.softmax(torch.randn(T, K_TOP, generator=gen), dim=1)
    return weights, ids


def _case(T, quant=W4A16, activation="swiglu_oai", expert_map=None, sparse=False, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000 * T)
    spec = _spec(quant, activation, expert_map)
    weights = _weights(spec, gen)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16)
    topk_w, topk_ids = _routing(T, gen, sparse)
    ref = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    return spec, weights, x, topk_w, topk_ids, ref


def _error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| over max |ref| (inf when out has NaNs)."""
    if ref.numel() == 0:
        return 0.0
    if torch.isnan(out).any():
        return float("inf")
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-6))


#: max error over max |ref|: bf16 intermediate and output; W4A8 fp8 intermediates (reciprocal-multiply
#: quantization may round an element one step apart from the reference division). Measured: <= 4e-3
BOUND = {"none": 1e-2, "fp8_per_tensor": 1e-2}


def _run(spec, weights, x, topk_w, topk_ids, **kw) -> torch.Tensor:
    tensors = gluon_layout.prepare_weights(spec, weights)
    return emulation.emulate_moe(spec, x, tensors, topk_w, topk_ids, **kw)


@pytest.mark.parametrize("T", [0, 1, 5, 33, 300])
def test_w4a16_swiglu(T):
    spec, weights, x, topk_w, topk_ids, ref = _case(T)
    out = _run(spec, weights, x, topk_w, topk_ids)
    assert out.shape == (T, H) and out.dtype == torch.bfloat16
    assert _error(out, ref) < BOUND["none"]


@pytest.mark.parametrize("T", [1, 33])
def test_w4a16_silu_sparse(T):
    spec, weights, x, topk_w, topk_ids, ref = _case(T, activation="silu", sparse=True, seed=1)
    assert _error(_run(spec, weights, x, topk_w, topk_ids), ref) < BOUND["none"]


@pytest.mark.parametrize("T", [1, 5, 300])
def test_w4a8(T):
    spec, weights, x, topk_w, topk_ids, ref = _case(T, quant=W4A8, seed=2)
    err = _error(_run(spec, weights, x, topk_w, topk_ids), ref)
    assert err < BOUND["fp8_per_tensor"], err


#: rank 1 of 2: global experts 5, 0, 3 are local (a non-increasing map: exercises local_order)
EP_MAP = (1, -1, -1, 2, -1, 0, -1)


@pytest.mark.parametrize("T", [5, 33])
def test_expert_parallel(T):
    spec, weights, x, topk_w, topk_ids, ref = _case(T, expert_map=EP_MAP, seed=3)
    out = _run(spec, weights, x, topk_w, topk_ids)
    assert _error(out, ref) < BOUND["none"]
    dropped = ~torch.isin(topk_ids, torch.tensor([0, 3, 5], dtype=torch.int32)).any(dim=1)
    assert torch.equal(out[dropped].float(), torch.zeros_like(out[dropped].float()))


def test_out_of_range_ids_dropped():
    spec, weights, x, topk_w, topk_ids, _ = _case(5, seed=4)
    topk_ids = topk_ids.clone()
    topk_ids[2, 1] = E + 3  # unchecked ids are dropped, as the reference drops them
    ref = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    assert _error(_run(spec, weights, x, topk_w, topk_ids), ref) < BOUND["none"]


def test_decode_grid_covers_active_blocks_only():
    """T=1, k=3 on E=7: 3 grid rows (not E or max_padded/BLOCK_M); the bound is what the sorter fills."""
    tiles = select_config(1)
    assert gluon_moe.active_blocks(1 * K_TOP, E, tiles.block_m) == K_TOP
    assert gluon_moe.active_blocks(4, 128, 16) == 4  # gpt-oss-120b decode
    assert gluon_moe.active_blocks(4096 * 4, 128, 128) == 128 + (4096 * 4 - 128) // 128


# ----------------------------------------------------------------------------- mutations


def _mutant_shuffle(w: torch.Tensor) -> torch.Tensor:
    """The shuffle with the 16-byte K groups of each chunk in the wrong order."""
    E_, N, KB = w.shape
    chunks = w.reshape(E_, N // 16, 16, KB // 64, 4, 16)
    return chunks.permute(0, 1, 3, 4, 2, 5).flip(3).reshape(E_, N * KB).contiguous()


@pytest.fixture(scope="module")
def case():
    return _case(33, seed=7)


def test_mutation_shuffle_is_caught(case, monkeypatch):
    spec, weights, x, topk_w, topk_ids, ref = case
    assert _error(_run(spec, weights, x, topk_w, topk_ids), ref) < BOUND["none"]
    monkeypatch.setattr(gluon_layout, "shuffle", _mutant_shuffle)
    assert _error(_run(spec, weights, x, topk_w, topk_ids), ref) > 10 * BOUND["none"]


def test_mutation_remap_is_caught(case):
    spec, weights, x, topk_w, topk_ids, ref = case
    tensors = gluon_layout.prepare_weights(spec, weights)
    tiles = select_config(33)
    st = gluon_moe.sort_tokens(spec, topk_ids, topk_w, tiles, tensors)
    used = int(st.num_valid_ids[0]) // tiles.block_m
    wrong = st.sorted_expert_ids.clone()
    wrong[:used] = torch.roll(wrong[:used], 1)  # every block sent to its neighbour's expert
    assert not torch.equal(wrong, st.sorted_expert_ids)
    bad = emulation.emulate_moe(
        spec, x, tensors, topk_w, topk_ids, sorted_tokens=st._replace(sorted_expert_ids=wrong)
    )
    assert _error(bad, ref) > 10 * BOUND["none"]


def test_mutation_grid_bound_is_caught(case, monkeypatch):
    spec, weights, x, topk_w, topk_ids, ref = case
    real = gluon_moe.active_blocks
    monkeypatch.setattr(emulation, "active_blocks", lambda *a: real(*a) // 2)
    assert _error(_run(spec, weights, x, topk_w, topk_ids), ref) == float("inf")  # unwritten slots


def test_mutation_scatter_is_caught(case, monkeypatch):
    spec, weights, x, topk_w, topk_ids, ref = case
    T = x.shape[0]

    def wrong_rows(packed, top_k):
        token, dest = _SLOT_ROWS(packed, top_k)
        return token, torch.where(token < T, (dest + top_k) % (T * top_k), dest)  # the next token's row

    monkeypatch.setattr(emulation, "slot_rows", wrong_rows)
    assert _error(_run(spec, weights, x, topk_w, topk_ids), ref) > 10 * BOUND["none"]


def _formula_lines(fn, *starts: str) -> list[str]:
    import inspect

    src = inspect.getsource(getattr(fn, "fn", fn))
    return [line.strip().lower() for line in src.splitlines() if line.strip().startswith(starts)]


def test_emulation_uses_the_kernels_index_formulas():
    """The emulation's offsets are the kernel's, line for line (constexpr names lowercased)."""
    from moe_plugin_amd._details import _gluon_moe as kernels

    b = ("chunk =", "return chunk")
    assert _formula_lines(kernels._b_offsets, *b) == _formula_lines(emulation.b_offsets, *b)
    assert len(_formula_lines(kernels._b_offsets, *b)) == 2
    s = ("return g",)
    assert _formula_lines(kernels._s_offsets, *s) == _formula_lines(emulation.s_offsets, *s) != []
    for part in ("token = packed & 0xffffff", "slot = (packed >> 24) & 0xff"):
        assert part in _formula_lines(kernels.moe_gemm2, "token =", "slot =")
        assert part in _formula_lines(emulation.slot_rows, "token =", "slot =")


def test_through_the_registered_prepare():
    """The plan for a (simulated) gfx950 picks amd.gluon.mxfp4; its prepare's tensors run the emulation."""
    import moe_core as moe
    from moe_core import DeviceInfo

    spec, weights, x, topk_w, topk_ids, ref = _case(5, quant=W4A8, expert_map=EP_MAP, seed=9)
    plan = moe.moe_plan(spec, DeviceInfo.parse("gfx950"))
    assert plan.kernel == "amd.gluon.mxfp4"
    prepared = plan.prepare(weights)
    assert prepared.kernel == "amd.gluon.mxfp4" and prepared.meta["i_pad"] == 128
    out = emulation.emulate_moe(spec, x, prepared.tensors, topk_w, topk_ids)
    assert _error(out, ref) < BOUND["fp8_per_tensor"]
