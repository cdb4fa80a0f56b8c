"""portable.triton sorting kernels: bit-identical to the moe_core.sorting references.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``) on
small shapes, with the launch geometry shrunk (``geometry``) so that every
path runs: one launch with one or several tiles, two launches with several
hist steps, several fill programs and fill steps. GPU tests (``gpu`` marker)
check real shapes, CUDA-graph capture and the absence of host syncs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_core import DeviceInfo
from moe_core.registry import dispatch_op, get_registry
from moe_core.sorting import (
    SortingRequest,
    align_block_size,
    align_block_size_reference,
    moe_sorting,
    moe_sorting_reference,
    ragged_metadata,
    ragged_metadata_reference,
)
from moe_plugin_portable import sorting as ps

from ..gpu_checks import no_host_sync, poison_allocator
from .helpers import DEVICE, gpu, needs_triton

NAMES = {
    "align_block_size": "portable.triton.align_block_size",
    "moe_sorting": "portable.triton.moe_sorting",
    "ragged_metadata": "portable.triton.ragged_metadata",
}

# Launch geometries: module constants of moe_plugin_portable.sorting, shrunk so small
# shapes take every path of the kernels.
PATHS = {
    "fused": {},
    "fused-tiles": {"FUSED_TILE": 64, "FILL_TILE": 1024, "FILL_PER_PROGRAM": 2048},
    "two-launch": {
        "FUSED_MAX_ENTRIES": 0,
        "TILE": 64,
        "MAX_TILE": 128,
        "TARGET_TILES": 8,
        "HIST_TILE": 256,
        "FILL_TILE": 1024,
        "FILL_PER_PROGRAM": 2048,
    },
    # several fill steps per program, several slot steps per block
    "two-launch-narrow": {
        "FUSED_MAX_ENTRIES": 0,
        "TILE": 64,
        "MAX_TILE": 64,
        "TARGET_TILES": 8,
        "HIST_TILE": 256,
        "FILL_TILE": 64,
        "FILL_PER_PROGRAM": 512,
    },
}


@contextlib.contextmanager
def geometry(path: str) -> Iterator[None]:
    saved = {name: getattr(ps, name) for name in PATHS[path]}
    try:
        for name, value in PATHS[path].items():
            setattr(ps, name, value)
        ps.launch_plan.cache_clear()
        yield
    finally:
        for name, value in saved.items():
            setattr(ps, name, value)
        ps.launch_plan.cache_clear()


# ----------------------------------------------------------------------------- inputs


def make_ids(
    T: int,
    k: int,
    E: int,
    *,
    distinct: bool = True,
    dtype: torch.dtype = torch.int32,
    seed: int = 0,
    device: str = DEVICE,
    skew: bool = False,
    out_of_range: bool = False,
) -> torch.Tensor:
    """Router ids: distinct per token (top-k like) or repeated; optionally skewed / out of range."""
    gen = torch.Generator().manual_seed(seed)
    if distinct and k <= E:
        ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k]
    else:
        ids = torch.randint(0, E, (T, k), generator=gen)
    if skew:  # most entries on a few experts: long runs, many blocks per expert
        hot = torch.randint(0, min(E, 3), (T, k), generator=gen)
        ids = torch.where(torch.rand(T, k, generator=gen) < 0.8, hot, ids)
    ids = ids.to(dtype)
    if out_of_range:
        bad = torch.tensor([-1, E, E + 7, -(2**31)], dtype=torch.int64)
        if dtype == torch.int64:  # would wrap into [0, E) if narrowed to int32 before the range check
            bad = torch.cat([bad, torch.tensor([2**32, 2**32 + E - 1, 2**40])])
        pick = torch.rand(T, k, generator=gen) < 0.25
        choice = bad[torch.randint(0, bad.numel(), (T, k), generator=gen)].to(dtype)
        ids = torch.where(pick, choice, ids)
    return ids.to(device)


def make_map(E: int, *, seed: int = 0, frac: float = 0.5, dtype=torch.int32, device: str = DEVICE):
    """A random subset of the experts, numbered locally in shuffled order; the rest -1."""
    gen = torch.Generator().manual_seed(seed + 1000)
    local = torch.randperm(E, generator=gen)[: max(1, round(E * frac))]
    emap = torch.full((E,), -1, dtype=torch.int64)
    emap[local] = torch.randperm(local.numel(), generator=gen)
    return emap.to(dtype).to(device)


def assert_same(got, want, what: str) -> None:
    assert type(got) is type(want), what
    for name, g, w in zip(want._fields, got, want):
        assert g.dtype == w.dtype, f"{what}: {name} dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{what}: {name} shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert g.device == w.device, f"{what}: {name} device"
        if not torch.equal(g, w):
            bad = (g != w).nonzero().flatten()[:8].tolist()
            raise AssertionError(
                f"{what}: {name} differs at {bad}: got {g.flatten()[bad].tolist()}, want {w.flatten()[bad].tolist()}"
            )


def check_all(
    ids: torch.Tensor,
    E: int,
    block: int,
    emap: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ops: tuple[str, ...] = ("align_block_size", "moe_sorting", "ragged_metadata"),
) -> None:
    """Each op's Triton kernel called directly equals its reference exactly."""
    T, k = ids.shape
    what = f"T={T} k={k} E={E} block={block} ids={ids.dtype} map={emap is not None} mask={mask is not None}"
    if "align_block_size" in ops:
        kw = {"num_experts": E, "block_size": block, "expert_map": emap}
        assert_same(ps.align_block_size_triton(ids, **kw), align_block_size_reference(ids, **kw), what)
    if "moe_sorting" in ops:
        gen = torch.Generator().manual_seed(T * 31 + k)
        w = torch.rand(T, k, generator=gen).to(ids.device)
        kw = {"num_experts": E, "unit_size": block, "expert_mask": mask}
        assert_same(ps.moe_sorting_triton(ids, w, **kw), moe_sorting_reference(ids, w, **kw), what)
    if "ragged_metadata" in ops:
        kw = {"num_experts": E, "expert_map": emap}
        assert_same(ps.ragged_metadata_triton(ids, **kw), ragged_metadata_reference(ids, **kw), what)


# ----------------------------------------------------------------------------- CPU (interpreter) or GPU

# (T, k, E, block, ids dtype, distinct per token, expert parallel, path)
CASES = [
    (1, 1, 1, 1, torch.int32, True, False, "fused"),
    (1, 8, 257, 128, torch.int64, True, True, "fused"),
    (2, 4, 3, 3, torch.int32, False, False, "fused"),
    (7, 2, 8, 16, torch.int64, False, True, "fused"),
    (16, 8, 64, 64, torch.int32, True, True, "fused"),
    (17, 4, 160, 1, torch.int32, True, False, "fused"),
    (100, 2, 8, 128, torch.int32, False, False, "fused"),
    (333, 8, 64, 16, torch.int32, True, False, "fused"),
    (17, 8, 257, 3, torch.int64, True, True, "fused-tiles"),
    (100, 4, 160, 64, torch.int32, False, True, "fused-tiles"),
    (7, 1, 1, 16, torch.int32, True, False, "two-launch"),
    (33, 8, 160, 16, torch.int64, True, True, "two-launch"),
    (100, 2, 257, 64, torch.int32, False, False, "two-launch"),
    (333, 4, 64, 128, torch.int32, True, True, "two-launch"),
    (40, 4, 16, 128, torch.int64, False, True, "two-launch-narrow"),
    (21, 3, 5, 3, torch.int32, False, False, "two-launch-narrow"),
]


@needs_triton
@pytest.mark.parametrize(("T", "k", "E", "block", "dtype", "distinct", "ep", "path"), CASES)
def test_matches_reference(T, k, E, block, dtype, distinct, ep, path):
    ids = make_ids(T, k, E, distinct=distinct, dtype=dtype, seed=T + E, skew=T >= 100)
    emap = make_map(E, seed=T) if ep else None
    mask = (emap >= 0).to(torch.uint8) if ep else None
    with geometry(path):
        check_all(ids, E, block, emap, mask)


@needs_triton
@pytest.mark.parametrize("path", ["fused", "two-launch"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_out_of_range_ids_are_dropped(path, dtype):
    """Unchecked ids outside [0, E) (and int64 values that would wrap to valid int32) take no slot."""
    ids = make_ids(40, 4, 24, dtype=dtype, seed=3, out_of_range=True)
    emap = make_map(24, seed=5, frac=0.6)
    emap[0] = 30  # a local id >= E: dropped like the reference does
    with geometry(path):
        check_all(ids, 24, 16)
        check_all(ids, 24, 16, emap=emap, ops=("align_block_size", "ragged_metadata"))


@needs_triton
def test_everything_dropped():
    """No kept entry: every slot is padding / -1, num_tokens_post_padded is 0."""
    ids = make_ids(9, 2, 8, seed=1)
    emap = torch.full((8,), -1, dtype=torch.int32, device=DEVICE)
    mask = torch.zeros(8, dtype=torch.bool, device=DEVICE)
    check_all(ids, 8, 16, emap, mask)
    got = ps.align_block_size_triton(ids, num_experts=8, block_size=16, expert_map=emap)
    assert int(got.num_tokens_post_padded) == 0 and bool((got.expert_ids == -1).all())


@needs_triton
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.int64])
def test_expert_mask_dtypes_and_map_dtype(mask_dtype):
    E = 40
    ids = make_ids(12, 6, E, seed=7, dtype=torch.int64)
    mask = (torch.arange(E, device=DEVICE) % 3 == 1).to(mask_dtype)
    if mask_dtype != torch.bool:
        mask = mask * 5  # any nonzero value marks a local expert
    check_all(ids, E, 16, mask=mask, ops=("moe_sorting",))
    check_all(ids, E, 16, emap=make_map(E, seed=2, dtype=torch.int64), ops=("align_block_size",))


@needs_triton
def test_strided_inputs():
    """Non-contiguous ids and weights are read through their strides, with no copy."""
    base = make_ids(10, 12, 32, seed=4)
    ids = base[:, 1::3]  # [10, 4], strides (12, 3)
    weights = torch.rand(4, 10, device=DEVICE).t()  # [10, 4], strides (1, 10)
    assert not ids.is_contiguous() and not weights.is_contiguous()
    check_all(ids, 32, 16, ops=("align_block_size", "ragged_metadata"))
    kw = {"num_experts": 32, "unit_size": 16}
    got = ps.moe_sorting_triton(ids, weights, **kw)
    assert_same(got, moe_sorting_reference(ids, weights, **kw), "strided moe_sorting")


@needs_triton
def test_moe_sorting_weight_dtypes_and_wide_slots():
    """Weights of any float dtype are converted exactly; slots >= 128 pack to negative int32."""
    ids = make_ids(3, 130, 200, seed=9)
    for wdtype in (torch.bfloat16, torch.float16, torch.float64):
        w = torch.randn(3, 130, device=DEVICE).to(wdtype)
        kw = {"num_experts": 200, "unit_size": 32}
        assert_same(ps.moe_sorting_triton(ids, w, **kw), moe_sorting_reference(ids, w, **kw), str(wdtype))
    assert bool((ps.moe_sorting_triton(ids, w, **kw).sorted_ids < 0).any())


SMALL = st.tuples(
    st.integers(1, 40),  # T
    st.sampled_from([1, 2, 3, 4, 8]),  # k
    st.sampled_from([1, 2, 3, 8, 33, 64, 160, 257]),  # E
    st.sampled_from([1, 3, 16, 64, 128]),  # block
    st.sampled_from([torch.int32, torch.int64]),
    st.booleans(),  # distinct
    st.sampled_from([None, 0.25, 1.0]),  # expert-parallel fraction
    st.sampled_from(["fused", "fused-tiles", "two-launch"]),
    st.integers(0, 2**16),  # seed
)


@needs_triton
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(SMALL)
def test_matches_reference_hypothesis(case):
    T, k, E, block, dtype, distinct, frac, path, seed = case
    ids = make_ids(T, k, E, distinct=distinct, dtype=dtype, seed=seed, skew=seed % 3 == 0)
    emap = None if frac is None else make_map(E, seed=seed, frac=frac)
    mask = None if emap is None else emap >= 0
    with geometry(path):
        check_all(ids, E, block, emap, mask)


# ----------------------------------------------------------------------------- launches


class _Counter:
    """Stands in for a JIT kernel: records each launch's grid, then launches."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        self.log.append((self.name, grid))
        return self.kernel[grid]


@needs_triton
@pytest.mark.parametrize(("path", "launches"), [("fused", 1), ("fused-tiles", 1), ("two-launch", 2)])
def test_launch_count_is_fixed(monkeypatch, path, launches):
    """The launches and their grids depend on the shapes only, not on the ids."""
    from moe_plugin_portable._details import _sorting as kernels

    log: list = []
    monkeypatch.setattr(kernels, "sort_count", _Counter("count", kernels.sort_count, log))
    monkeypatch.setattr(kernels, "sort_place", _Counter("place", kernels.sort_place, log))
    with geometry(path):
        runs = []
        for seed, skew in ((0, False), (1, True)):
            log.clear()
            ids = make_ids(50, 4, 16, seed=seed, skew=skew)
            ps.align_block_size_triton(ids, num_experts=16, block_size=16)
            runs.append(list(log))
        assert len(runs[0]) == launches == ps.launch_plan("align_block_size", 200, 16, 16).launches
        assert runs[0] == runs[1]


# ----------------------------------------------------------------------------- registration, dispatch


def test_kernel_entries():
    entries = {e.name: e for e in ps.kernel_entries()}
    assert set(entries) == set(NAMES.values())
    for op, name in NAMES.items():
        e = entries[name]
        assert (e.family, e.op, e.capability, e.priority) == ("sorting", op, "any", ps.PRIORITY)
        assert e.features == frozenset({"expert_map"})
        assert e.plugin == ""  # the registry sets it


def test_registered_by_plugin():
    registry = get_registry()
    for name in NAMES.values():
        assert registry.get(name).plugin == "portable"


@needs_triton
def test_public_api_dispatches_to_triton():
    """moe_core.sorting.* run the portable kernels (plugins loaded by default)."""
    E, block = 24, 16
    ids = make_ids(20, 4, E, seed=11)
    emap = make_map(E, seed=11)
    weights = torch.rand(20, 4, device=DEVICE)
    device = torch.device(DEVICE)
    requests = {
        "align_block_size": (
            SortingRequest("align_block_size", E, 4, block, ids.dtype, True),
            ps.align_block_size_triton,
        ),
        "moe_sorting": (SortingRequest("moe_sorting", E, 4, block, ids.dtype, True), ps.moe_sorting_triton),
        "ragged_metadata": (
            SortingRequest("ragged_metadata", E, 4, None, ids.dtype, True),
            ps.ragged_metadata_triton,
        ),
    }
    for op, (request, fn) in requests.items():
        assert dispatch_op("sorting", op, device, request) is fn, op
    kw = {"num_experts": E, "block_size": block, "expert_map": emap}
    assert_same(align_block_size(ids, **kw), align_block_size_reference(ids, **kw), "public align")
    mask = emap >= 0
    kw = {"num_experts": E, "unit_size": block, "expert_mask": mask}
    assert_same(
        moe_sorting(ids, weights, **kw), moe_sorting_reference(ids, weights, **kw), "public moe_sorting"
    )
    kw = {"num_experts": E, "expert_map": emap}
    assert_same(ragged_metadata(ids, **kw), ragged_metadata_reference(ids, **kw), "public ragged")


@needs_triton
def test_public_api_empty_input():
    """T == 0 never reaches the kernel; the public API still answers (reference lengths)."""
    ids = torch.empty(0, 8, dtype=torch.int32, device=DEVICE)
    got = align_block_size(ids, num_experts=16, block_size=16)
    assert got.sorted_token_ids.numel() == 0 and int(got.num_tokens_post_padded) == 0
    assert_same(
        ps.align_block_size_triton(ids, num_experts=16, block_size=16),
        align_block_size_reference(ids, num_experts=16, block_size=16),
        "empty",
    )


# ----------------------------------------------------------------------------- supports()


def _refusal(op: str, device: DeviceInfo, **kw) -> str | None:
    fields = {"num_experts": 256, "top_k": 8, "block_size": 64, "ids_dtype": torch.int32}
    fields.update(kw)
    if op == "ragged_metadata":
        fields["block_size"] = None
    request = SortingRequest(
        op,
        fields["num_experts"],
        fields["top_k"],
        fields["block_size"],
        fields["ids_dtype"],
        fields.get("expert_parallel", False),
    )
    return get_registry().get(NAMES[op]).refusal(request, device)


@pytest.mark.parametrize("op", sorted(NAMES))
def test_supports_on_simulated_gpu(op):
    pytest.importorskip("triton")
    h100, mi355 = DeviceInfo.parse("sm_90"), DeviceInfo.parse("gfx950")
    for dev in (h100, mi355):
        assert _refusal(op, dev) is None
        assert _refusal(op, dev, num_experts=1024, top_k=16, expert_parallel=True) is None
        assert (
            _refusal(op, dev, ids_dtype=torch.int64, block_size=3 if op != "ragged_metadata" else None)
            is None
        )
        reason = _refusal(op, dev, num_experts=1025)
        assert reason is not None and "num_experts=1025 > 1024" in reason, reason
        reason = _refusal(op, dev, ids_dtype=torch.int16)
        assert reason is not None and "int16" in reason, reason


def test_supports_cpu_needs_interpreter(monkeypatch):
    pytest.importorskip("triton")
    cpu = DeviceInfo.parse("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = _refusal("align_block_size", cpu)
    assert reason is not None and "interpreter" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _refusal("align_block_size", cpu) is None


def test_import_is_cheap():
    """Registration imports no Triton kernels (they load on first use)."""
    import subprocess
    import sys

    code = (
        "import sys; import moe_plugin_portable.sorting as s; s.kernel_entries(); "
        "print('moe_plugin_portable._details._sorting' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_launch_plan_is_static():
    plan = ps.launch_plan("align_block_size", 2048 * 8, 256, 64)
    assert plan.launches == 2 and plan.grid >= plan.num_tiles
    assert plan.num_tiles * plan.tile >= 2048 * 8
    assert plan.blocks_per_program * plan.grid >= plan.max_blocks
    decode = ps.launch_plan("align_block_size", 8, 256, 64)
    assert decode.launches == 1 and decode.grid == 1


# ----------------------------------------------------------------------------- GPU

GPU_SHAPES = [(256, 8, 16), (256, 8, 64), (256, 8, 128), (128, 8, 64), (8, 2, 64)]
GPU_TOKENS = [1, 8, 33, 512, 2048, 8192]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", GPU_TOKENS)
@pytest.mark.parametrize(("E", "k", "block"), GPU_SHAPES)
def test_gpu_real_shapes(E, k, block, T):
    for seed, (distinct, skew, ep) in enumerate([(True, False, False), (False, True, True)]):
        ids = make_ids(T, k, E, distinct=distinct, skew=skew, seed=seed + T, device="cuda")
        emap = make_map(E, seed=seed, device="cuda") if ep else None
        mask = None if emap is None else emap >= 0
        poison_allocator()
        check_all(ids, E, block, emap, mask)
        poison_allocator()
        check_all(ids.long(), E, block, emap, mask, ops=("align_block_size",))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 33, 2048, 8192])
def test_gpu_no_host_sync(T):
    ids = make_ids(T, 8, 256, seed=1, device="cuda")
    weights = torch.rand(T, 8, device="cuda")
    emap = make_map(256, seed=1, device="cuda")
    mask = emap >= 0

    def run():
        ps.align_block_size_triton(ids, num_experts=256, block_size=64, expert_map=emap)
        ps.align_block_size_triton(ids, num_experts=256, block_size=64)
        ps.moe_sorting_triton(ids, weights, num_experts=256, unit_size=32, expert_mask=mask)
        ps.ragged_metadata_triton(ids, num_experts=256, expert_map=emap)

    run()  # compile outside the check
    torch.cuda.synchronize()
    with no_host_sync():
        run()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8, 512, 2048, 8192])
@pytest.mark.parametrize("ep", [False, True])
def test_gpu_cuda_graph(T, ep):
    """Capture once, replay with new ids copied into the static input: equal to eager."""
    E, k, block = 256, 8, 64
    static_ids = make_ids(T, k, E, seed=0, device="cuda")
    static_w = torch.rand(T, k, device="cuda")
    emap = make_map(E, seed=3, device="cuda") if ep else None
    mask = None if emap is None else emap >= 0

    def run():
        return (
            ps.align_block_size_triton(static_ids, num_experts=E, block_size=block, expert_map=emap),
            ps.moe_sorting_triton(static_ids, static_w, num_experts=E, unit_size=block, expert_mask=mask),
            ps.ragged_metadata_triton(static_ids, num_experts=E, expert_map=emap),
        )

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile and warm up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    for seed in (1, 2):
        new_ids = make_ids(T, k, E, seed=seed, skew=seed == 2, distinct=seed == 1, device="cuda")
        static_ids.copy_(new_ids)
        static_w.copy_(torch.rand(T, k, device="cuda"))
        graph.replay()
        eager = run()
        for got, want in zip(outs, eager):
            assert_same(got, want, f"graph T={T} seed={seed}")
        want = align_block_size_reference(static_ids, num_experts=E, block_size=block, expert_map=emap)
        assert_same(outs[0], want, f"graph vs reference T={T}")


@gpu
@pytest.mark.gpu
def test_gpu_public_api(monkeypatch):
    """moe_core.sorting.* on the GPU, the portable kernels forced: exact."""
    monkeypatch.setenv("MOE_BACKEND", "portable.triton")
    E, k, block = 256, 8, 64
    ids = make_ids(300, k, E, seed=5, device="cuda")
    emap = make_map(E, seed=5, device="cuda")
    weights = torch.rand(300, k, device="cuda")
    request = SortingRequest("align_block_size", E, k, block, ids.dtype, True)
    assert dispatch_op("sorting", "align_block_size", ids.device, request) is ps.align_block_size_triton
    kw = {"num_experts": E, "block_size": block, "expert_map": emap}
    assert_same(align_block_size(ids, **kw), align_block_size_reference(ids, **kw), "public align")
    kw = {"num_experts": E, "unit_size": block, "expert_mask": emap >= 0}
    assert_same(
        moe_sorting(ids, weights, **kw), moe_sorting_reference(ids, weights, **kw), "public moe_sorting"
    )
    kw = {"num_experts": E, "expert_map": emap}
    assert_same(ragged_metadata(ids, **kw), ragged_metadata_reference(ids, **kw), "public ragged")
