"""portable.triton.routing against ``select_experts_reference`` (CPU interpreter and GPU).

On the CPU (``TRITON_INTERPRET=1``) ids must equal the reference's exactly, in
order, and weights agree within 1e-6 (absolute and relative) for every logits
dtype: bf16/fp16 logits are upcast to float32 before any math, in the kernel
as in the reference, so the bound is the same as for float32 logits.

On a GPU the kernel's ``exp``/``sigmoid``/division are the fast hardware
versions, torch's are not: a row whose choice scores tie up to float32
rounding may legitimately order differently. The GPU checks therefore accept
a rare row whose ids differ only where the reference's own choice scores
agree within 1e-5 (see ``_assert_routing``); every other row is exact.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import moe_core
from moe_core import DeviceInfo, RoutingSpec
from moe_core.registry import get_registry
from moe_core.routing import RoutingRequest, select_experts_reference
from moe_plugin_portable import routing as portable_routing
from moe_plugin_portable.routing import kernel_entries, select_experts_triton

from ..gpu_checks import no_host_sync
from .helpers import DEVICE, INTERPRET, gpu, needs_triton

KERNEL = "portable.triton.routing"
TOL = 1e-6


def _spec(method, k, **kw) -> RoutingSpec:
    return RoutingSpec(method=method, top_k=k, **kw)


#: name -> (spec, E, has_bias)
CASES = {
    "softmax-E8-k2": (_spec("softmax", 2), 8, False),
    "softmax-E7-k1": (_spec("softmax", 1), 7, False),
    "softmax-renorm-E24-k5": (_spec("softmax", 5, renormalize=True), 24, False),
    "softmax-renorm-E96-k16-scaled": (
        _spec("softmax", 16, renormalize=True, routed_scaling_factor=0.5),
        96,
        False,
    ),
    "softmax-E160-k8-shared": (_spec("softmax", 8, num_fused_shared_experts=2), 160, False),
    "after_topk-E32-k4": (_spec("softmax_after_topk", 4), 32, False),
    "after_topk-E160-k8-scaled": (_spec("softmax_after_topk", 8, routed_scaling_factor=2.0), 160, False),
    "sigmoid-E16-k1": (_spec("sigmoid", 1), 16, False),
    "sigmoid-renorm-E24-k5-scaled": (
        _spec("sigmoid", 5, renormalize=True, routed_scaling_factor=1.5),
        24,
        False,
    ),
    "sigmoid-E512-k16": (_spec("sigmoid", 16), 512, False),
    "dsv3-E256-k8-g8-4-shared": (
        _spec(
            "biased_grouped",
            8,
            renormalize=True,
            num_expert_group=8,
            topk_group=4,
            routed_scaling_factor=2.5,
            num_fused_shared_experts=1,
        ),
        256,
        True,
    ),
    "grouped-E160-k5-g8-3-shared2": (
        _spec("biased_grouped", 5, num_expert_group=8, topk_group=3, num_fused_shared_experts=2),
        160,
        True,
    ),
    "grouped-renorm-E96-k16-g4-2": (
        _spec("biased_grouped", 16, renormalize=True, num_expert_group=4, topk_group=2),
        96,
        True,
    ),
    "grouped-E96-k6-g3-2-padded-group": (
        _spec(
            "biased_grouped",
            6,
            renormalize=True,
            num_expert_group=3,
            topk_group=2,
            num_fused_shared_experts=1,
        ),
        96,
        True,
    ),
    "grouped-E7-k2-g7-3-one-per-group": (
        _spec("biased_grouped", 2, renormalize=True, num_expert_group=7, topk_group=3),
        7,
        True,
    ),
    "grouped-E24-k5-one-group-nobias": (_spec("biased_grouped", 5, renormalize=True), 24, False),
    "grouped-E64-k4-all-groups-kept": (
        _spec("biased_grouped", 4, num_expert_group=8, topk_group=8, routed_scaling_factor=1.25),
        64,
        True,
    ),
    "grouped-E512-k16-g16-4": (
        _spec("biased_grouped", 16, renormalize=True, num_expert_group=16, topk_group=4),
        512,
        True,
    ),
}

_SEEDS = {name: 1000 * i for i, name in enumerate(sorted(CASES))}


def _inputs(
    T: int,
    E: int,
    has_bias: bool,
    dtype: torch.dtype,
    seed: int,
    device: str = DEVICE,
    bias_dtype: torch.dtype = torch.float32,
):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    logits = (torch.randn(T, E, generator=gen) * 2.0).to(dtype).to(device)
    bias = (torch.randn(E, generator=gen) * 0.5).to(bias_dtype).to(device) if has_bias else None
    return logits, bias


def _assert_exact(got, want, context=""):
    w, ids = got
    rw, rids = want
    assert ids.dtype == torch.int32 and w.dtype == torch.float32, context
    assert ids.shape == rids.shape and w.shape == rw.shape, context
    assert ids.is_contiguous() and w.is_contiguous(), context
    assert torch.equal(ids.cpu(), rids.cpu()), f"{context}\nids {ids.cpu()}\nref {rids.cpu()}"
    torch.testing.assert_close(w.cpu(), rw.cpu(), atol=TOL, rtol=TOL, msg=lambda m: f"{context}: {m}")


# --------------------------------------------------------------------------- CPU interpreter / any device


@needs_triton
@pytest.mark.parametrize("T", [1, 3, 17])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_fp32(case, T):
    spec, E, has_bias = CASES[case]
    logits, bias = _inputs(T, E, has_bias, torch.float32, _SEEDS[case] + T)
    got = select_experts_triton(logits, spec, bias)
    _assert_exact(got, select_experts_reference(logits, spec, bias), f"{case} T={T}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_half_logits(case, dtype):
    """bf16/fp16 logits (many exact ties after rounding): same ids, weights within 1e-6."""
    spec, E, has_bias = CASES[case]
    bias_dtype = torch.bfloat16 if dtype == torch.bfloat16 and "E160" in case else torch.float32
    logits, bias = _inputs(5, E, has_bias, dtype, _SEEDS[case] + 7, bias_dtype=bias_dtype)
    got = select_experts_triton(logits, spec, bias)
    _assert_exact(got, select_experts_reference(logits, spec, bias), f"{case} {dtype}")


@needs_triton
@pytest.mark.parametrize("block_t", [1, 2, 4, 8])
@pytest.mark.parametrize("case", ["dsv3-E256-k8-g8-4-shared", "softmax-E160-k8-shared", "after_topk-E32-k4"])
def test_tokens_per_program(monkeypatch, case, block_t):
    """Every BLOCK_T the GPU heuristic can pick (and more), with a ragged last program."""
    monkeypatch.setattr(portable_routing, "launch_config", lambda T, E, groups=1: (block_t, 1))
    spec, E, has_bias = CASES[case]
    logits, bias = _inputs(7, E, has_bias, torch.float32, 77 + block_t)
    _assert_exact(select_experts_triton(logits, spec, bias), select_experts_reference(logits, spec, bias))


@needs_triton
def test_strided_logits():
    spec, E, has_bias = CASES["dsv3-E256-k8-g8-4-shared"]
    big, bias = _inputs(4, 2 * E, has_bias, torch.float32, 5)
    bias = bias[:E] if bias is not None else None
    for logits in (big[:, ::2], big[:, E:], big.t().contiguous().t()[:, :E]):
        assert not logits.is_contiguous()
        got = select_experts_triton(logits, spec, bias)
        _assert_exact(got, select_experts_reference(logits, spec, bias), f"strides {logits.stride()}")


# ---- ties


_TIE_SPECS = {
    "softmax": (_spec("softmax", 5, renormalize=True), False),
    "after_topk": (_spec("softmax_after_topk", 5), False),
    "sigmoid": (_spec("sigmoid", 5, routed_scaling_factor=2.0), False),
    "grouped": (
        _spec(
            "biased_grouped",
            5,
            renormalize=True,
            num_expert_group=4,
            topk_group=2,
            num_fused_shared_experts=1,
        ),
        False,
    ),
    "grouped-bias": (_spec("biased_grouped", 5, num_expert_group=8, topk_group=3), True),
}


@needs_triton
@pytest.mark.parametrize("name", sorted(_TIE_SPECS))
def test_all_equal_logits(name):
    """Every score equal: the lowest ids, in order (and the lowest groups)."""
    spec, has_bias = _TIE_SPECS[name]
    E = 24
    logits = torch.zeros(3, E, device=DEVICE)
    bias = torch.zeros(E, device=DEVICE) if has_bias else None
    w, ids = select_experts_triton(logits, spec, bias)
    _assert_exact((w, ids), select_experts_reference(logits, spec, bias), name)
    assert ids[:, :5].tolist() == [[0, 1, 2, 3, 4]] * 3


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(_TIE_SPECS))
def test_heavy_ties_and_signed_zeros(name, dtype):
    """Logits from a handful of values, -0.0 among them: the tie order is the reference's."""
    spec, has_bias = _TIE_SPECS[name]
    E = 96
    gen = torch.Generator().manual_seed(len(name))
    logits = torch.round(torch.randn(6, E, generator=gen) * 0.8)  # many -0.0 and +0.0
    assert (logits == 0).any() and torch.signbit(logits[logits == 0]).any()
    logits = logits.to(dtype).to(DEVICE)
    bias = (torch.randint(-1, 2, (E,), generator=gen) * 0.25).to(DEVICE) if has_bias else None
    _assert_exact(
        select_experts_triton(logits, spec, bias), select_experts_reference(logits, spec, bias), name
    )


@needs_triton
def test_saturated_sigmoid_ties():
    """Logits of +-30: sigmoid rounds to equal values; ties break by the lowest id."""
    gen = torch.Generator().manual_seed(3)
    logits = ((torch.randint(-1, 2, (5, 64), generator=gen) * 30).float()).to(DEVICE)
    spec = _spec("biased_grouped", 8, renormalize=True, num_expert_group=8, topk_group=4)
    _assert_exact(select_experts_triton(logits, spec, None), select_experts_reference(logits, spec, None))


@needs_triton
@pytest.mark.parametrize("order", [(0, 1, 2, 3), (3, 1, 2, 0), (2, 3, 0, 1)])
def test_equal_group_scores(order):
    """Groups with equal top-2 sums from different members: the lowest group ids are kept.

    Logits 0 give s = 0.5 exactly; dyadic biases make every sum exact. Three
    groups sum to 1.0 ((.5, .5), (.75, .25), (1.0, 0.0)), one is lower; two
    groups are kept, so the group holding the single best expert (1.0) may be
    dropped depending on its id.
    """
    patterns = [[0.0, 0.0, -1.0, -1.0], [0.25, -0.25, -1.0, -1.0], [0.5, -0.5, -1.0, -1.0], [-1.0] * 4]
    bias = torch.tensor([v for g in order for v in patterns[g]], device=DEVICE)
    logits = torch.zeros(2, 16, device=DEVICE)
    spec = _spec("biased_grouped", 3, renormalize=True, num_expert_group=4, topk_group=2)
    w, ids = select_experts_triton(logits, spec, bias)
    rw, rids = select_experts_reference(logits, spec, bias)
    _assert_exact((w, ids), (rw, rids), f"order {order}")
    kept = sorted(g for g in range(4) if order[g] != 3)[:2]
    assert {int(i) // 4 for i in ids[0]} <= set(kept)


@needs_triton
def test_minus_inf_scores_never_pick_padding():
    """Choice scores of -inf (in kept groups) tie with dropped groups' -inf: lowest id wins, never a pad lane.

    E=20 in 4 groups of 5 (lanes padded to 8 per group, so pad lanes of group
    0 sit where experts 5..7 would be); groups 1 and 3 are kept, each with
    two finite scores, and k=10 needs six -inf experts: the reference takes
    the lowest ids, experts 0..4 of the dropped group 0, then expert 7.
    """
    bias = torch.full((20,), float("-inf"))
    bias[[5, 6, 15, 16]] = torch.tensor([1.0, 0.5, 0.75, 0.25])
    logits = torch.randn(3, 20, generator=torch.Generator().manual_seed(9))
    logits[0] = 0.0
    spec = _spec("biased_grouped", 10, renormalize=True, num_expert_group=4, topk_group=2)
    logits, bias = logits.to(DEVICE), bias.to(DEVICE)
    w, ids = select_experts_triton(logits, spec, bias)
    _assert_exact((w, ids), select_experts_reference(logits, spec, bias))
    assert ids[0].tolist() == [5, 15, 6, 16, 0, 1, 2, 3, 4, 7]
    assert all(len(set(row)) == 10 for row in ids.tolist())


@needs_triton
@pytest.mark.parametrize("method", ["sigmoid", "softmax_after_topk", "biased_grouped"])
def test_signed_zero_ties(method):
    """-0.0 and +0.0 are equal scores (as in torch's sort): the lower id goes first."""
    gen = torch.Generator().manual_seed(11)
    signs = torch.randint(0, 2, (4, 32), generator=gen).bool()
    logits = torch.where(signs, torch.tensor(-0.0), torch.tensor(0.0))
    logits[:, ::5] = -1.0
    assert torch.signbit(logits).any() and (~torch.signbit(logits)).any()
    spec = _spec(method, 8, renormalize=True) if method != "softmax_after_topk" else _spec(method, 8)
    logits = logits.to(DEVICE)
    w, ids = select_experts_triton(logits, spec, None)
    _assert_exact((w, ids), select_experts_reference(logits, spec, None), method)
    assert ids[:, :8].tolist() == [[1, 2, 3, 4, 6, 7, 8, 9]] * 4


@needs_triton
@pytest.mark.parametrize("method", ["softmax", "sigmoid", "softmax_after_topk"])
def test_minus_inf_logits_never_pick_padding(method):
    """E=7 (one pad lane), only 3 finite logits, k=5: zeros/-inf tie to the lowest ids."""
    logits = torch.full((2, 7), float("-inf"))
    logits[:, [6, 2, 4]] = torch.tensor([0.5, 1.5, -1.0])
    spec = _spec(method, 5, renormalize=method == "sigmoid")
    logits = logits.to(DEVICE)
    w, ids = select_experts_triton(logits, spec, None)
    _assert_exact((w, ids), select_experts_reference(logits, spec, None), method)
    assert ids[0].tolist() == [2, 6, 4, 0, 1]


# ---- the public API and registration


@pytest.mark.skipif(not INTERPRET, reason="dispatch on CPU tensors needs TRITON_INTERPRET=1")
def test_public_api_dispatches_here(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args[1].method)
        return select_experts_triton(*args)

    monkeypatch.setattr(portable_routing, "select_experts_triton", spy)  # before plugins load
    spec, E, has_bias = CASES["dsv3-E256-k8-g8-4-shared"]
    logits, bias = _inputs(3, E, has_bias, torch.bfloat16, 21, device="cpu")
    request = RoutingRequest(spec, E, logits.dtype, True)
    cands = get_registry().candidates(
        "routing", "select_experts", request, moe_core.device_info(logits.device)
    )
    assert cands[0].chosen and cands[0].name == KERNEL, [(c.name, c.reason) for c in cands]
    got = moe_core.select_experts(logits, spec, correction_bias=bias)
    assert calls == ["biased_grouped"]
    _assert_exact(got, select_experts_reference(logits, spec, bias))
    spec2 = _spec("softmax", 4, renormalize=True)
    got = moe_core.select_experts(logits, spec2)
    assert calls == ["biased_grouped", "softmax"]
    _assert_exact(got, select_experts_reference(logits, spec2))


def test_cpu_without_interpreter_falls_back(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    spec = _spec("softmax", 2)
    request = RoutingRequest(spec, 8, torch.float32)
    reason = get_registry().get(KERNEL).refusal(request, DeviceInfo.parse("cpu"))
    assert reason is not None and "TRITON_INTERPRET=1" in reason
    logits = torch.randn(3, 8)
    _assert_exact(moe_core.select_experts(logits, spec), select_experts_reference(logits, spec))


def test_entry_declaration():
    (entry,) = kernel_entries()
    assert entry.name == KERNEL and entry.family == "routing" and entry.op == "select_experts"
    assert entry.features == {
        "softmax",
        "softmax_after_topk",
        "sigmoid",
        "biased_grouped",
        "fused_shared_experts",
    }
    assert entry.capability == "any" and entry.priority == 50
    assert KERNEL in {e.name for e in get_registry().entries("routing")}


def test_registration_imports_no_triton():
    code = (
        "import sys, moe_core; before = 'triton' in sys.modules; "
        "import moe_plugin_portable.routing as r; r.kernel_entries(); "
        "print(before or 'triton' not in sys.modules, 'moe_plugin_portable._details._routing' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr


_GPU = DeviceInfo.parse("sm_90")
_OK = [
    (CASES["dsv3-E256-k8-g8-4-shared"][0], 256, torch.bfloat16, True),
    (_spec("softmax", 8, renormalize=True), 128, torch.float32, False),
    (_spec("softmax_after_topk", 4, num_fused_shared_experts=3), 32, torch.float16, False),
    (_spec("sigmoid", 16), 512, torch.bfloat16, False),
]
_REFUSED = [
    (_spec("softmax", 8), 600, torch.bfloat16, False, "600 experts exceed the kernel's limit of 512"),
    (_spec("sigmoid", 17), 64, torch.float32, False, "top_k=17 exceeds the kernel's limit of 16"),
    (_spec("softmax", 2), 64, torch.int32, False, "must be float32, bfloat16 or float16, got torch.int32"),
    (
        _spec("softmax", 2),
        64,
        torch.float64,
        False,
        "must be float32, bfloat16 or float16, got torch.float64",
    ),
    (_spec("softmax", 9), 8, torch.float32, False, "top_k=9 exceeds the 8 experts"),
    (
        _spec("biased_grouped", 4, num_expert_group=8, topk_group=2),
        100,
        torch.float32,
        True,
        "100 experts do not split into 8 groups",
    ),
    (
        _spec("biased_grouped", 9, num_expert_group=8, topk_group=1),
        64,
        torch.float32,
        True,
        "top_k=9 exceeds the 8 experts of the 1 kept groups",
    ),
    (
        _spec("softmax", 2, num_fused_shared_experts=65),
        64,
        torch.float32,
        False,
        "65 fused shared experts exceed the limit of 64",
    ),
    (_spec("softmax", 2), 64, torch.float32, True, "correction_bias only applies to biased_grouped"),
]


@pytest.mark.parametrize("device", ["sm_90", "gfx942", "sm_100"])
@pytest.mark.parametrize("i", range(len(_OK)))
def test_supports_real_shapes(i, device):
    spec, E, dtype, has_bias = _OK[i]
    (entry,) = kernel_entries()
    assert entry.refusal(RoutingRequest(spec, E, dtype, has_bias), DeviceInfo.parse(device)) is None


@pytest.mark.parametrize("i", range(len(_REFUSED)))
def test_supports_refusals(i):
    spec, E, dtype, has_bias, reason = _REFUSED[i]
    (entry,) = kernel_entries()
    got = entry.refusal(RoutingRequest(spec, E, dtype, has_bias), _GPU)
    assert got is not None and reason in got, got


# --------------------------------------------------------------------------- GPU

#: name -> (spec, E, has_bias)
GPU_CASES = {
    "dsv3-E256-k8-g8-4-shared1": CASES["dsv3-E256-k8-g8-4-shared"],
    "softmax-E128-k8": (_spec("softmax", 8, renormalize=True), 128, False),
    "after_topk-E32-k4": (_spec("softmax_after_topk", 4), 32, False),
    "sigmoid-E16-k1": (_spec("sigmoid", 1), 16, False),
}


def _choice_scores(logits: torch.Tensor, spec: RoutingSpec, bias: torch.Tensor | None) -> torch.Tensor:
    """The float32 scores the reference ranks experts by (before group masking)."""
    x = logits.float()
    if spec.method == "softmax":
        return torch.softmax(x, dim=-1)
    if spec.method == "biased_grouped":
        s = torch.sigmoid(x)
        return s + bias.float() if bias is not None else s
    return x


def _assert_routing(got, logits, spec, bias, context=""):
    """Exact rows, except rare rows whose differing ids have reference choice scores within 1e-5."""
    w, ids = got
    rw, rids = select_experts_reference(logits, spec, bias)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32 and ids.shape == rids.shape, context
    assert bool(torch.isfinite(w).all()), f"{context}: non-finite weights"
    same = (ids == rids).all(dim=1)
    bad = (~same).nonzero().flatten().tolist()
    if bad:
        k = spec.top_k
        scores = _choice_scores(logits, spec, bias)
        rows = torch.tensor(bad, device=ids.device)
        ours = scores[rows].gather(1, ids[rows, :k].long())
        theirs = scores[rows].gather(1, rids[rows, :k].long())
        assert len(bad) <= max(2, logits.shape[0] // 500), f"{context}: {len(bad)} rows differ: {bad[:8]}"
        assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), f"{context}: rows {bad} differ beyond ties"
    torch.testing.assert_close(w[same], rw[same], atol=TOL, rtol=TOL, msg=lambda m: f"{context}: {m}")


def _poison_allocator(nbytes: int) -> None:
    """Leave NaN/-1 bytes in the caching allocator's free blocks so fresh outputs start poisoned."""
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del junk


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("T", [1, 7, 256, 4096])
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_real_shapes(case, T, dtype):
    spec, E, has_bias = GPU_CASES[case]
    logits, bias = _inputs(T, E, has_bias, dtype, 4242 + T + len(case), device="cuda")
    _poison_allocator(T * spec.num_slots * 8)
    torch.cuda.synchronize()
    with no_host_sync():
        got = select_experts_triton(logits, spec, bias)
    _assert_routing(got, logits, spec, bias, f"{case} T={T} {dtype}")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
def test_gpu_cuda_graph_replay(case):
    spec, E, has_bias = GPU_CASES[case]
    T = 64
    logits, bias = _inputs(T, E, has_bias, torch.bfloat16, 99, device="cuda")
    static = logits.clone()
    select_experts_triton(static, spec, bias)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_w, g_ids = select_experts_triton(static, spec, bias)
    for seed in (1, 2):
        fresh, _ = _inputs(T, E, False, torch.bfloat16, 500 + seed, device="cuda")
        static.copy_(fresh)
        g_w.fill_(float("nan"))
        g_ids.fill_(-1)
        graph.replay()
        e_w, e_ids = select_experts_triton(fresh, spec, bias)
        torch.cuda.synchronize()
        assert torch.equal(g_ids, e_ids) and torch.equal(g_w, e_w), case
        _assert_routing((g_w, g_ids), fresh, spec, bias, f"{case} replay {seed}")


@gpu
@pytest.mark.gpu
def test_gpu_public_api(monkeypatch):
    monkeypatch.setenv("MOE_BACKEND", KERNEL)
    spec, E, has_bias = GPU_CASES["dsv3-E256-k8-g8-4-shared1"]
    logits, bias = _inputs(33, E, has_bias, torch.bfloat16, 7, device="cuda")
    request = RoutingRequest(spec, E, logits.dtype, True)
    cands = get_registry().candidates(
        "routing", "select_experts", request, moe_core.device_info(logits.device)
    )
    assert any(c.name == KERNEL and c.reason is None for c in cands), [(c.name, c.reason) for c in cands]
    got = moe_core.select_experts(logits, spec, correction_bias=bias)
    _assert_routing(got, logits, spec, bias, "public API")
