"""amd.triton.moe_sorting: every path bit-identical to moe_sorting_reference, and valid by the contract.

CPU tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``) on
small shapes. The path thresholds and tile sizes are module constants of
``moe_plugin_amd.sorting``; ``geometry()`` lowers them so that small ``T``
takes every path (one, two or three launches) with several chunks, tiles,
prefix steps, fill programs and fill steps. Each result is compared with the
reference exactly (the kernel is stable: entries of an expert in flat order)
and checked by the contract's invariants (``moe_core.testing``). GPU tests
(``gpu`` marker) run the real geometry up to T = 16384, in CUDA graphs and
with host syncs made errors.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_core import DeviceInfo
from moe_core.registry import dispatch_op, get_registry
from moe_core.sorting import SortingRequest, moe_sorting, moe_sorting_reference
from moe_core.testing import check_sorted_tokens
from moe_plugin_amd import sorting as amd

from ..gpu_checks import no_host_sync, poison_allocator
from .helpers import DEVICE, gpu, needs_triton

NAME, HIP_NAME = "amd.triton.moe_sorting", "amd.triton.moe_sorting.hip"

#: Module constants of moe_plugin_amd.sorting per test geometry.
GEOMETRIES: dict[str, dict[str, int]] = {
    "default": {},
    # every T on one path; several fill programs and slot steps per unit
    "oneshot": {"ONESHOT_MAX_TOKENS": 10**6, "FILL_UNITS": 4, "FILL_TILE": 64},
    "expert": {
        "ONESHOT_MAX_TOKENS": 0,
        "EXPERT_MAX_TOKENS": 10**6,
        "EXPERT_CHUNK": 64,
        "FILL_TILE": 64,
    },
    "expert-grouped": {
        "ONESHOT_MAX_TOKENS": 0,
        "EXPERT_MAX_TOKENS": 10**6,
        "EXPERT_CHUNK": 64,
        "EXPERTS_PER_PROGRAM": 16,
    },
    "tiled": {
        "ONESHOT_MAX_TOKENS": 0,
        "EXPERT_MAX_TOKENS": 0,
        "TILE": 64,
        "CHUNK": 16,
        "PREFIX_EXPERTS": 8,
        "PREFIX_ROWS": 4,
        "FILL_UNITS": 4,
        "FILL_TILE": 64,
    },
    # the three paths by T: <= 4 oneshot, <= 40 per expert, above tiled (T up to 300 in the interpreter)
    "scaled": {
        "ONESHOT_MAX_TOKENS": 4,
        "EXPERT_MAX_TOKENS": 40,
        "EXPERTS_PER_PROGRAM": 16,
        "TILE": 128,
        "PREFIX_ROWS": 8,
    },
}
PATH_OF = {"oneshot": "oneshot", "expert": "expert", "expert-grouped": "expert", "tiled": "tiled"}


@contextlib.contextmanager
def geometry(name: str) -> Iterator[None]:
    saved = {key: getattr(amd, key) for key in GEOMETRIES[name]}
    try:
        for key, value in GEOMETRIES[name].items():
            setattr(amd, key, value)
        yield
    finally:
        for key, value in saved.items():
            setattr(amd, key, value)


# ----------------------------------------------------------------------------- inputs


def make_ids(
    T: int,
    k: int,
    E: int,
    *,
    kind: str = "topk",
    dtype: torch.dtype = torch.int32,
    seed: int = 0,
    out_of_range: bool = False,
    device: str = DEVICE,
) -> torch.Tensor:
    """Router ids: ``topk`` (distinct per token), ``random`` (repeats) or ``skew`` (most on 3 experts)."""
    gen = torch.Generator().manual_seed(seed)
    if kind == "topk" and k <= E:
        ids = torch.rand(T, E, generator=gen).argsort(dim=1)[:, :k]
    else:
        ids = torch.randint(0, E, (T, k), generator=gen)
    if kind == "skew":
        hot = torch.randint(0, min(E, 3), (T, k), generator=gen)
        ids = torch.where(torch.rand(T, k, generator=gen) < 0.8, hot, ids)
    ids = ids.to(dtype)
    if out_of_range:
        bad = [-1, E, E + 7, -(2**31)] + ([2**32, 2**32 + E - 1, 2**40] if dtype == torch.int64 else [])
        bad = torch.tensor(bad, dtype=torch.int64)
        pick = torch.rand(T, k, generator=gen) < 0.25
        ids = torch.where(pick, bad[torch.randint(0, bad.numel(), (T, k), generator=gen)].to(dtype), ids)
    return ids.to(device)


def make_mask(E: int, frac: float, seed: int = 0, device: str = DEVICE) -> torch.Tensor:
    """A random set of local experts (at least one when ``frac > 0``)."""
    gen = torch.Generator().manual_seed(seed + 77)
    mask = torch.rand(E, generator=gen) < frac
    if frac > 0:
        mask[torch.randint(0, E, (1,), generator=gen)] = True
    return mask.to(device)


def make_weights(T: int, k: int, seed: int = 0, dtype=torch.float32, device: str = DEVICE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 5)
    return torch.rand(T, k, generator=gen).to(dtype).to(device)


def check(ids, weights, E: int, unit: int, mask=None, what: str = "") -> None:
    """The kernel's result equals the reference exactly and satisfies the contract (stable)."""
    kw = {"num_experts": E, "unit_size": unit, "expert_mask": mask}
    got = amd.moe_sorting_triton(ids, weights, **kw)
    want = moe_sorting_reference(ids, weights, **kw)
    what = what or f"T={ids.shape[0]} k={ids.shape[1]} E={E} unit={unit} mask={mask is not None}"
    assert type(got) is type(want), what
    for name, g, w in zip(want._fields, got, want):
        assert (g.dtype, g.shape, g.device) == (w.dtype, w.shape, w.device), f"{what}: {name}"
        if not torch.equal(g, w):
            bad = (g != w).nonzero().flatten()[:8].tolist()
            raise AssertionError(
                f"{what}: {name} differs at {bad}: got {g[bad].tolist()}, want {w[bad].tolist()}"
            )
    check_sorted_tokens(got, ids, weights, stable=True, **kw)


# ----------------------------------------------------------------------------- every path vs the reference

# (geometry, T, k, E, unit, ids dtype, kind, mask fraction or None)
CASES = [
    ("oneshot", 1, 1, 1, 16, torch.int32, "topk", None),
    ("oneshot", 1, 9, 257, 32, torch.int32, "topk", 0.5),
    ("oneshot", 3, 9, 513, 128, torch.int64, "topk", None),
    ("oneshot", 7, 4, 3, 16, torch.int32, "random", None),
    ("oneshot", 16, 8, 64, 64, torch.int32, "skew", 0.3),
    ("oneshot", 45, 9, 33, 16, torch.int64, "skew", None),
    ("expert", 5, 2, 1, 16, torch.int32, "random", None),
    ("expert", 17, 4, 33, 16, torch.int32, "topk", 0.5),
    ("expert", 40, 9, 64, 32, torch.int64, "skew", None),
    ("expert", 90, 3, 6, 128, torch.int32, "random", 1.0),
    ("expert-grouped", 30, 9, 513, 128, torch.int32, "topk", 0.3),
    ("expert-grouped", 25, 8, 257, 64, torch.int64, "skew", None),
    ("tiled", 9, 3, 5, 64, torch.int32, "random", None),
    ("tiled", 33, 8, 64, 64, torch.int32, "skew", 0.5),
    ("tiled", 70, 4, 513, 16, torch.int64, "topk", None),
    ("tiled", 100, 9, 257, 32, torch.int32, "topk", 0.25),
    ("tiled", 300, 2, 8, 128, torch.int32, "skew", None),
]


@needs_triton
@pytest.mark.parametrize(("geo", "T", "k", "E", "unit", "dtype", "kind", "frac"), CASES)
def test_paths_match_reference(geo, T, k, E, unit, dtype, kind, frac):
    ids = make_ids(T, k, E, kind=kind, dtype=dtype, seed=T * 7 + E)
    mask = None if frac is None else make_mask(E, frac, seed=T)
    with geometry(geo):
        assert amd.sort_plan(T, k, E, unit).path == PATH_OF[geo]
        check(ids, make_weights(T, k, seed=T), E, unit, mask)


@needs_triton
@pytest.mark.parametrize("T", [1, 16, 17, 40])
def test_default_thresholds(T):
    """The shipped thresholds: T <= 16 one launch, above two (the tiled path starts at T > 2048)."""
    assert amd.sort_plan(T, 9, 20, 32).path == ("oneshot" if T <= 16 else "expert")
    assert amd.sort_plan(2049, 9, 257, 32).path == "tiled"
    ids = make_ids(T, 9, 20, kind="skew", seed=T)
    check(ids, make_weights(T, 9, seed=T), 20, 32, make_mask(20, 0.6, seed=T) if T % 2 else None)


@needs_triton
@pytest.mark.parametrize("geo", ["oneshot", "expert", "tiled"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_out_of_range_ids_are_dropped(geo, dtype):
    """Unchecked ids outside [0, E) (int64 values that would wrap into range too) take no slot."""
    ids = make_ids(30, 4, 24, kind="random", dtype=dtype, seed=3, out_of_range=True)
    with geometry(geo):
        check(ids, make_weights(30, 4), 24, 16)
        check(ids, make_weights(30, 4), 24, 16, make_mask(24, 0.5, seed=1))


@needs_triton
@pytest.mark.parametrize("geo", ["oneshot", "expert", "tiled"])
def test_everything_dropped(geo):
    """A mask with no local expert: every slot is padding, every unit -1, num_valid_ids[0] == 0."""
    ids = make_ids(11, 3, 8, seed=2)
    mask = torch.zeros(8, dtype=torch.bool, device=DEVICE)
    with geometry(geo):
        check(ids, make_weights(11, 3), 8, 32, mask)
        got = amd.moe_sorting_triton(ids, make_weights(11, 3), num_experts=8, unit_size=32, expert_mask=mask)
    assert got.num_valid_ids.tolist() == [0, 11] and bool((got.sorted_expert_ids == -1).all())


@needs_triton
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int32, torch.int64])
def test_expert_mask_dtypes(mask_dtype):
    """Any nonzero mask value marks a local expert; local ids are ranks among them."""
    E = 40
    mask = (torch.arange(E, device=DEVICE) % 3 == 1).to(mask_dtype)
    if mask_dtype != torch.bool:
        mask = mask * 5
    ids = make_ids(12, 6, E, seed=7, dtype=torch.int64)
    for geo in ("oneshot", "tiled"):
        with geometry(geo):
            check(ids, make_weights(12, 6), E, 16, mask)


@needs_triton
def test_strided_inputs_weight_dtypes_and_wide_slots():
    """Strided ids/weights are read in place; any float weights convert exactly; slots >= 128 pack negative."""
    base = make_ids(10, 12, 32, seed=4)
    ids = base[:, 1::3]  # [10, 4], strides (12, 3)
    weights = torch.rand(4, 10, device=DEVICE).t()  # [10, 4], strides (1, 10)
    assert not ids.is_contiguous() and not weights.is_contiguous()
    for geo in ("oneshot", "expert", "tiled"):
        with geometry(geo):
            check(ids, weights, 32, 16)
    wide = make_ids(3, 130, 200, seed=9)
    for wdtype in (torch.bfloat16, torch.float16, torch.float64):
        check(wide, make_weights(3, 130, dtype=wdtype), 200, 32)
    got = amd.moe_sorting_triton(wide, make_weights(3, 130), num_experts=200, unit_size=32)
    assert bool((got.sorted_ids < 0).any())


@needs_triton
def test_empty_batch():
    """T == 0: the reference's empty result, nothing launched."""
    ids = torch.empty(0, 9, dtype=torch.int32, device=DEVICE)
    got = amd.moe_sorting_triton(ids, torch.empty(0, 9, device=DEVICE), num_experts=257, unit_size=32)
    assert [t.numel() for t in got] == [0, 0, 0, 2] and got.num_valid_ids.tolist() == [0, 0]
    check(ids, torch.empty(0, 9, device=DEVICE), 257, 32)


CASE = st.tuples(
    st.integers(0, 300),  # T
    st.integers(1, 9),  # k
    st.integers(1, 513),  # E
    st.sampled_from([16, 32, 64, 128]),  # unit
    st.sampled_from([torch.int32, torch.int64]),
    st.sampled_from(["topk", "random", "skew"]),
    st.sampled_from([None, 0.3, 1.0]),  # expert mask fraction
    st.integers(0, 2**16),  # seed
)


@needs_triton
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CASE)
def test_matches_reference_hypothesis(case):
    """T in 0..300 through every path (thresholds 4 and 40), E 1..513, k 1..9, units 16..128, masks."""
    T, k, E, unit, dtype, kind, frac, seed = case
    ids = make_ids(T, k, E, kind=kind, dtype=dtype, seed=seed)
    mask = None if frac is None else make_mask(E, frac, seed=seed)
    with geometry("scaled"):
        check(ids, make_weights(T, k, seed=seed), E, unit, mask)


# ----------------------------------------------------------------------------- launches


class _Counter:
    """Stands in for a JIT kernel: records each launch's grid, then launches."""

    def __init__(self, name, kernel, log):
        self.name, self.kernel, self.log = name, kernel, log

    def __getitem__(self, grid):
        self.log.append((self.name, grid))
        return self.kernel[grid]


KERNELS = (
    "sort_oneshot",
    "sort_expert_count",
    "sort_expert_scatter",
    "sort_tile_count",
    "sort_tile_prefix",
    "sort_tile_scatter",
)


@needs_triton
@pytest.mark.parametrize(("geo", "launches"), [("oneshot", 1), ("expert", 2), ("tiled", 3)])
def test_launch_count_is_fixed(monkeypatch, geo, launches):
    """Each path makes a fixed number of launches whose grids depend on the shapes only."""
    from moe_plugin_amd._details import _sorting as kernels

    log: list = []
    for name in KERNELS:
        monkeypatch.setattr(kernels, name, _Counter(name, getattr(kernels, name), log))
    runs = []
    with geometry(geo):
        for seed, kind in ((0, "topk"), (1, "skew")):
            log.clear()
            amd.moe_sorting_triton(
                make_ids(50, 4, 16, kind=kind, seed=seed), make_weights(50, 4), num_experts=16
            )
            runs.append(list(log))
        assert len(runs[0]) == launches == amd.sort_plan(50, 4, 16, 32).launches
    assert runs[0] == runs[1]
    log.clear()
    amd.moe_sorting_triton(make_ids(0, 4, 16), make_weights(0, 4), num_experts=16)
    assert log == []


def test_sort_plan_is_static():
    big = amd.sort_plan(16384, 9, 257, 32)
    assert big.path == "tiled" and big.launches == 3
    assert big.num_tiles * big.tile >= 16384 * 9 and big.grid >= big.num_tiles
    assert big.units_per_program * big.grid >= big.max_units
    mid = amd.sort_plan(256, 9, 257, 32)
    assert mid.path == "expert" and mid.grid == 257 and mid.units_per_program * 257 >= mid.max_units
    one = amd.sort_plan(1, 9, 257, 32)
    assert one.path == "oneshot" and one.launches == 1 and one.grid == 1


# ----------------------------------------------------------------------------- registration and dispatch


def _request(**kw) -> SortingRequest:
    fields = {"num_experts": 257, "top_k": 9, "block_size": 32, "ids_dtype": torch.int32}
    fields.update(kw)
    return SortingRequest(
        "moe_sorting",
        fields["num_experts"],
        fields["top_k"],
        fields["block_size"],
        fields["ids_dtype"],
        fields.get("expert_parallel", False),
    )


def test_kernel_entries():
    entries = {e.name: e for e in amd.kernel_entries()}
    assert set(entries) == {NAME, HIP_NAME}
    any_, hip = entries[NAME], entries[HIP_NAME]
    assert (any_.family, any_.op, any_.capability) == ("sorting", "moe_sorting", "any")
    assert (hip.family, hip.op, hip.capability) == ("sorting", "moe_sorting", "hip")
    assert any_.apply is hip.apply is amd.moe_sorting_triton
    assert any_.features == hip.features == frozenset({"expert_map"})
    assert any_.priority < 50 < hip.priority  # the portable sorter's priority is 50


def test_registered_by_plugin():
    registry = get_registry()
    assert registry.get(NAME).plugin == registry.get(HIP_NAME).plugin == "amd"


def test_dispatch_prefers_it_on_amd_only(monkeypatch):
    """gfx950: this kernel (above portable); sm_90: portable (this one below it); forced: this one anywhere."""
    pytest.importorskip("triton")
    gfx950, h100 = DeviceInfo.parse("gfx950"), DeviceInfo.parse("sm_90")
    request = _request(expert_parallel=True)
    cands = get_registry().candidates("sorting", "moe_sorting", request, gfx950)
    assert cands[0].name == HIP_NAME and cands[0].chosen
    assert dispatch_op("sorting", "moe_sorting", gfx950, request) is amd.moe_sorting_triton
    refused = {c.name: c.reason for c in get_registry().candidates("sorting", "moe_sorting", request, h100)}
    assert "needs an amd device" in refused[HIP_NAME] and refused[NAME] is None
    if "portable.triton.moe_sorting" in refused:
        from moe_plugin_portable.sorting import moe_sorting_triton as portable

        assert dispatch_op("sorting", "moe_sorting", h100, request) is portable
    monkeypatch.setenv("MOE_BACKEND", NAME)
    for dev in (h100, gfx950):
        assert dispatch_op("sorting", "moe_sorting", dev, request) is amd.moe_sorting_triton


def test_supports():
    pytest.importorskip("triton")
    registry = get_registry()
    for dev in (DeviceInfo.parse("gfx950"), DeviceInfo.parse("sm_90")):
        assert (
            registry.get(NAME).refusal(_request(num_experts=1024, top_k=16, expert_parallel=True), dev)
            is None
        )
        assert registry.get(NAME).refusal(_request(ids_dtype=torch.int64, block_size=3), dev) is None
        assert "num_experts=1025 > 1024" in registry.get(NAME).refusal(_request(num_experts=1025), dev)
        assert "int16" in registry.get(NAME).refusal(_request(ids_dtype=torch.int16), dev)


def test_supports_cpu_needs_interpreter(monkeypatch):
    pytest.importorskip("triton")
    cpu = DeviceInfo.parse("cpu")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "interpreter" in get_registry().get(NAME).refusal(_request(), cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert get_registry().get(NAME).refusal(_request(), cpu) is None


@needs_triton
def test_public_api_forced(monkeypatch):
    """moe_core.sorting.moe_sorting runs this kernel when MOE_BACKEND names it."""
    monkeypatch.setenv("MOE_BACKEND", NAME)
    ids, weights, mask = make_ids(20, 4, 24, seed=11), make_weights(20, 4), make_mask(24, 0.5)
    request = SortingRequest("moe_sorting", 24, 4, 16, ids.dtype, True)
    assert dispatch_op("sorting", "moe_sorting", ids.device, request) is amd.moe_sorting_triton
    kw = {"num_experts": 24, "unit_size": 16, "expert_mask": mask}
    got, want = moe_sorting(ids, weights, **kw), moe_sorting_reference(ids, weights, **kw)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_import_is_cheap():
    """Registration imports neither Triton nor aiter (kernels load on first use)."""
    code = (
        "import sys; import moe_plugin_amd.plugin as p; p.register_kernels(lambda e: None); "
        "print(sorted(m for m in ('triton', 'aiter', 'moe_plugin_amd._details._sorting') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- GPU

GPU_SHAPES = [(257, 9, 32), (256, 8, 64), (128, 8, 16), (513, 8, 128), (8, 2, 128)]
GPU_TOKENS = [1, 16, 17, 256, 2048, 2049, 16384]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", GPU_TOKENS)
@pytest.mark.parametrize(("E", "k", "unit"), GPU_SHAPES)
def test_gpu_matches_reference(E, k, unit, T):
    for seed, (kind, frac, dtype) in enumerate(
        [("topk", None, torch.int32), ("skew", 0.5, torch.int32), ("random", None, torch.int64)]
    ):
        ids = make_ids(T, k, E, kind=kind, dtype=dtype, seed=seed + T, device="cuda")
        mask = None if frac is None else make_mask(E, frac, seed=seed, device="cuda")
        poison_allocator()
        check(ids, make_weights(T, k, seed=seed, device="cuda"), E, unit, mask)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 256, 2048, 16384])
def test_gpu_no_host_sync(T):
    ids = make_ids(T, 9, 257, seed=1, device="cuda")
    weights = make_weights(T, 9, device="cuda")
    mask = make_mask(257, 0.5, device="cuda")

    def run():
        amd.moe_sorting_triton(ids, weights, num_experts=257, unit_size=32)
        amd.moe_sorting_triton(ids, weights, num_experts=257, unit_size=32, expert_mask=mask)

    run()  # compile outside the check
    torch.cuda.synchronize()
    with no_host_sync():
        run()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 16, 256, 2048, 16384])
@pytest.mark.parametrize("masked", [False, True])
def test_gpu_cuda_graph(T, masked):
    """Capture once, replay with new ids and weights copied into the static inputs: equal to the reference."""
    E, k, unit = 257, 9, 32
    static_ids = make_ids(T, k, E, seed=0, device="cuda")
    static_w = make_weights(T, k, device="cuda")
    mask = make_mask(E, 0.4, device="cuda") if masked else None
    kw = {"num_experts": E, "unit_size": unit, "expert_mask": mask}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        amd.moe_sorting_triton(static_ids, static_w, **kw)  # compile and warm up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = amd.moe_sorting_triton(static_ids, static_w, **kw)
    for seed, kind in ((1, "topk"), (2, "skew")):
        static_ids.copy_(make_ids(T, k, E, kind=kind, seed=seed, device="cuda"))
        static_w.copy_(make_weights(T, k, seed=seed, device="cuda"))
        graph.replay()
        want = moe_sorting_reference(static_ids, static_w, **kw)
        for name, g, w in zip(want._fields, outs, want):
            assert torch.equal(g, w), f"graph T={T} seed={seed}: {name}"


@gpu
@pytest.mark.gpu
def test_gpu_public_api(monkeypatch):
    """moe_core.sorting.moe_sorting on the GPU, this kernel forced: exact."""
    monkeypatch.setenv("MOE_BACKEND", NAME)
    ids, weights = make_ids(300, 9, 257, seed=5, device="cuda"), make_weights(300, 9, device="cuda")
    mask = make_mask(257, 0.5, device="cuda")
    request = SortingRequest("moe_sorting", 257, 9, 32, ids.dtype, True)
    assert dispatch_op("sorting", "moe_sorting", ids.device, request) is amd.moe_sorting_triton
    kw = {"num_experts": 257, "unit_size": 32, "expert_mask": mask}
    got, want = moe_sorting(ids, weights, **kw), moe_sorting_reference(ids, weights, **kw)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
