"""Per-token-count dispatch (moe_core.dispatch): tuning, the table file, planning, prepare, apply, compile."""

from __future__ import annotations

import json

import pytest
import torch

import moe_core
import moe_core.bench.timing
from moe_core import KernelEntry, MoEInputError, MoESpec, moe_apply, moe_plan
from moe_core import dispatch as dp
from moe_core.cli import main
from moe_core.planner import DISPATCH, DispatchedWeights
from moe_core.plugins import plugin_manager
from moe_core.reference import _apply as reference_apply
from moe_core.reference import _prepare as reference_prepare
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, random_routing, relative_error, tolerance

SPEC = MoESpec(num_experts=8, top_k=2, hidden_size=48, intermediate_size=40, dtype=torch.float32)
SLOW, FAST = 1.0, 0.1  # seconds of the virtual clock a fake kernel takes
SMALL, BIG = "fake.small.experts", "fake.big.experts"


class Clock:
    """The timing helpers' ``time`` module, replaced: time passes only when a fake kernel says so
    (a shared 2-core CI machine is too noisy for real sleeps to order kernels reliably)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class Kernels:
    """Fake CPU kernels (all correct unless named so): a log of (kernel, T) per apply, prepares per kernel."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.applied: list[tuple[str, int]] = []
        self.prepared: list[str] = []

    def entry(self, name, delay=lambda T: 0.0, prepare=reference_prepare, apply=reference_apply, **kw):
        def run_apply(spec, x, prepared, w, ids, out):
            assert prepared.kernel == name  # each kernel gets its own part
            self.applied.append((name, x.shape[0]))
            self.clock.now += delay(x.shape[0])
            apply(spec, x, prepared, w, ids, out)

        def run_prepare(spec, weights, device):
            self.prepared.append(name)
            return prepare(spec, weights, device)

        base = {"family": "experts", "capability": "cpu", "needs_contiguous": False, "priority": 1}
        base.update(kw)
        return KernelEntry(name, apply=run_apply, prepare=run_prepare, **base)

    def install(self, *entries) -> None:
        class Plugin:
            @moe_core.hookimpl
            def register_kernels(self, register):
                for e in entries:
                    register(e)

        record = plugin_manager().load_module("fake", Plugin())
        assert record.status == "loaded", record.error

    def standard(self) -> None:
        """``small`` (static choice, priority 10) is fast up to 32 tokens, ``big`` beyond; two bad ones."""

        def wrong(spec, x, prepared, w, ids, out):
            out.zero_()

        def raises(spec, x, prepared, w, ids, out):
            raise RuntimeError("kernel exploded")

        self.install(
            self.entry(SMALL, lambda T: FAST if T <= 32 else SLOW, priority=10),
            self.entry(BIG, lambda T: SLOW if T <= 32 else FAST, priority=5),
            self.entry("fake.wrong.experts", apply=wrong, priority=20),
            self.entry("fake.raises.experts", apply=raises, priority=20),
        )


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(moe_core.bench.timing, "time", clock)
    return clock


@pytest.fixture
def kernels(clock) -> Kernels:
    return Kernels(clock)


def _table(per_bucket: list[str | None], spec: MoESpec = SPEC) -> dp.DispatchTable:
    """A hand-made table for ``spec`` on this CPU, with the current versions."""
    buckets = [
        dp.Bucket(k, 1.0 if k else None, [dp.BUCKETS[i][0]] if k else [], {k: 1.0} if k else {})
        for i, k in enumerate(per_bucket)
    ]
    return dp.DispatchTable(
        dp.spec_key(spec),
        spec.describe(),
        dp.device_name(moe_core.device_info("cpu")),
        dp.environment_versions(),
        buckets,
    )


def _inputs(T: int, seed: int = 0):
    x = torch.randn(T, SPEC.hidden_size, generator=torch.Generator().manual_seed(seed))
    w, ids = random_routing(
        moe_core.RoutingSpec("softmax", SPEC.top_k, renormalize=True), T, SPEC.num_experts, seed=seed + 1
    )
    return x, w, ids


def test_bucket_edges():
    edges = {1: 0, 2: 1, 8: 1, 9: 2, 32: 2, 33: 3, 128: 3, 129: 4, 512: 4, 513: 5, 2048: 5, 2049: 6, 10**6: 6}
    assert {T: dp.bucket_index(T) for T in edges} == edges
    assert [dp.bucket_label(i) for i in range(7)] == [
        "1",
        "2-8",
        "9-32",
        "33-128",
        "129-512",
        "513-2048",
        ">2048",
    ]
    assert [dp.bucket_index(T) for T in dp.DEFAULT_TOKENS] == list(range(7))


def test_tuning_picks_the_fastest_correct_kernel_per_bucket_and_round_trips(kernels, tmp_path):
    kernels.standard()
    table = dp.tune_dispatch(
        SPEC, "cpu", tokens=(1, 5, 20, 100), kernels=["fake"], iters=3, warmup=1, folder=tmp_path
    )
    assert table.kernels == [SMALL, SMALL, SMALL, BIG, None, None, None]
    assert table.buckets[3].times[SMALL] > table.buckets[3].times[BIG] == table.buckets[3].us
    for bucket in table.buckets[:4]:  # the fastest ones are wrong or raise: never chosen
        assert bucket.excluded["fake.wrong.experts"].startswith("wrong: relative error")
        assert "RuntimeError: kernel exploded" in bucket.excluded["fake.raises.experts"]
    assert table.device == dp.device_name(moe_core.device_info("cpu")) and table.key == dp.spec_key(SPEC)
    # the file: keyed by device name, then spec key; loads back equal
    path = dp.table_path(table.device, tmp_path)
    assert table.path == str(path)
    data = json.loads(path.read_text())
    assert data["device"] == table.device and list(data["entries"]) == [table.key]
    assert data["entries"][table.key]["versions"]["torch"] == torch.__version__
    loaded = dp.load_table(SPEC, "cpu", folder=tmp_path)
    assert loaded == table and loaded.measured[100][BIG] == table.measured[100][BIG]
    # a second spec merges into the same file
    other = SPEC.replace(top_k=1)
    dp.save_table(_table([SMALL] * 7, other), tmp_path)
    assert len(json.loads(path.read_text())["entries"]) == 2
    assert dp.load_table(SPEC, "cpu", folder=tmp_path) == table


def test_nothing_to_tune_with_one_kernel():
    assert dp.tune_dispatch(SPEC, "cpu", tokens=(1,), iters=1) is None  # only the reference is loaded
    with pytest.raises(MoEInputError, match="simulated"):
        dp.tune_dispatch(SPEC, "sm_90")


def test_plan_tune_true_saves_a_table_the_next_plan_loads(kernels, clock, monkeypatch):
    def slow_reference(*args):  # tune=True times every usable kernel: keep the reference out of the race
        clock.now += 3 * SLOW
        reference_apply(*args)

    monkeypatch.setattr(moe_core.reference, "_apply", slow_reference)  # registered when plugins load
    kernels.install(
        kernels.entry(SMALL, lambda T: FAST if T <= 32 else SLOW, priority=10),
        kernels.entry(BIG, lambda T: SLOW if T <= 32 else FAST, priority=5),
    )
    monkeypatch.setattr(dp, "DEFAULT_TOKENS", (1, 100))
    plan = moe_plan(SPEC, "cpu", tune=True)
    assert plan.dispatch is not None and plan.dispatch.kernels[0] == SMALL and plan.dispatch.kernels[3] == BIG
    assert plan.kernel == DISPATCH and plan.kernels == (SMALL, BIG) and plan.static_entry.name == SMALL
    again = moe_plan(SPEC, "cpu")
    assert (
        again.dispatch == plan.dispatch and again.kernel_for(1) == SMALL and again.kernel_for(4000) == SMALL
    )
    assert again.kernel_for(100) == BIG
    # no table: static priorities, exactly as before
    assert moe_plan(SPEC, "cpu", dispatch=False).kernel == SMALL
    assert moe_plan(SPEC, "cpu", backend=BIG).kernel == BIG  # a forced backend never dispatches
    monkeypatch.setenv("MOE_DISPATCH", "0")
    assert moe_plan(SPEC, "cpu").dispatch is None


def test_without_a_table_the_static_choice_runs(kernels):
    kernels.standard()
    plan = moe_plan(SPEC, "cpu")
    assert plan.dispatch is None and plan.routes is None and plan.kernel == "fake.raises.experts"
    assert "dispatch table" not in plan.explain()


@pytest.mark.parametrize("change", ["versions", "device", "kernel"])
def test_stale_table_is_ignored_with_a_warning(kernels, change):
    kernels.install(kernels.entry(SMALL, priority=10), kernels.entry(BIG, priority=5))
    table = _table([SMALL, SMALL, SMALL, BIG, BIG, BIG, BIG])
    if change == "versions":
        table.versions["torch"] = "0.0.1"
    elif change == "kernel":
        table.buckets[6].kernel = "fake.gone.experts"
    path = dp.save_table(table)
    if change == "device":  # a file copied from another machine under this device's name
        data = json.loads(path.read_text())
        data["entries"][table.key]["device"] = "NVIDIA H200"
        path.write_text(json.dumps(data))
    match = {
        "versions": r"other versions \(torch 0\.0\.1 ->",
        "device": "tuned on 'NVIDIA H200'",
        "kernel": "fake.gone.experts are not usable now",
    }[change]
    with pytest.warns(dp.StaleDispatchWarning, match=match):
        plan = moe_plan(SPEC, "cpu")
    assert plan.dispatch is None and plan.kernel == SMALL
    assert "dispatch table: " in plan.explain() and "ignored" in plan.explain()
    if change != "kernel":  # the file itself is stale
        with pytest.warns(dp.StaleDispatchWarning, match=match):
            assert dp.load_table(SPEC, "cpu") is None


def test_a_table_for_another_spec_is_refused(kernels):
    kernels.install(kernels.entry(SMALL, priority=10), kernels.entry(BIG, priority=5))
    with pytest.warns(dp.StaleDispatchWarning, match="it is for"):
        plan = moe_plan(SPEC, "cpu", dispatch=_table([BIG] * 7, SPEC.replace(top_k=1)))
    assert plan.kernel == SMALL


def test_apply_dispatches_by_token_count(kernels):
    kernels.install(kernels.entry(SMALL, priority=10), kernels.entry(BIG, priority=5))
    plan = moe_plan(SPEC, "cpu", dispatch=_table([SMALL, SMALL, SMALL, BIG, BIG, None, BIG]))
    assert plan.kernel == DISPATCH and plan.kernels == (SMALL, BIG)
    weights = random_expert_weights(SPEC, seed=3)
    prepared = plan.prepare(weights)
    assert isinstance(prepared, DispatchedWeights) and prepared.kernel == DISPATCH
    expect = {1: SMALL, 8: SMALL, 9: SMALL, 32: SMALL, 33: BIG, 512: BIG, 513: SMALL, 2049: BIG}
    for T, kernel in expect.items():
        kernels.applied.clear()
        x, w, ids = _inputs(T, seed=T)
        out = torch.full((T, SPEC.hidden_size), float("nan"))
        moe_apply(plan, x, prepared, w, ids, out=out)
        assert kernels.applied == [(kernel, T)], T
        want = fused_experts_reference(SPEC, x, weights, w, ids, compute_dtype=torch.float64)
        assert relative_error(out, want) <= tolerance(SPEC)
    kernels.applied.clear()
    empty = moe_apply(
        plan, torch.empty(0, 48), prepared, torch.empty(0, 2), torch.empty(0, 2, dtype=torch.int32)
    )
    assert empty.shape == (0, 48) and kernels.applied == []
    text = plan.explain()
    assert f"chosen: dispatch by token count over {SMALL}, {BIG}" in text
    assert f"T 33-128     {BIG}" in text and "T 513-2048   not tuned (static choice)" in text
    assert f"static choice {SMALL}" in text


def test_a_table_naming_one_kernel_plans_it_plainly(kernels):
    kernels.install(kernels.entry(SMALL, priority=10), kernels.entry(BIG, priority=5))
    plan = moe_plan(SPEC, "cpu", dispatch=_table([BIG] * 7))
    assert plan.kernel == BIG and plan.routes is None and plan.static_entry.name == SMALL
    prepared = plan.prepare(random_expert_weights(SPEC))
    assert prepared.kernel == BIG and not isinstance(prepared, DispatchedWeights)
    assert f"chosen by the dispatch table: {BIG}" in plan.explain()


def _copying_prepare(spec, weights, device):
    return {k: v.clone() for k, v in reference_prepare(spec, weights, device).items()}


def _transposing_prepare(spec, weights, device):
    tensors = dict(reference_prepare(spec, weights, device))
    tensors["w13"] = tensors["w13"].transpose(1, 2).contiguous()  # [E, H, 2I]: a layout of its own
    return tensors


def _transposed_apply(spec, x, prepared, w, ids, out):
    tensors = dict(prepared.tensors)
    tensors["w13"] = tensors["w13"].transpose(1, 2)
    reference_apply(spec, x, moe_core.PreparedWeights(prepared.kernel, tensors), w, ids, out)


def test_prepare_once_per_kernel_and_shared_buffers_counted_once(kernels):
    copy, layout = "fake.copy.experts", "fake.layout.experts"
    kernels.install(
        kernels.entry(SMALL, priority=10),
        kernels.entry(BIG, priority=5),
        kernels.entry(copy, prepare=_copying_prepare),
        kernels.entry(layout, prepare=_transposing_prepare, apply=_transposed_apply),
    )
    plan = moe_plan(SPEC, "cpu", dispatch=_table([SMALL, copy, layout, BIG, BIG, SMALL, layout]))
    assert "memory: not prepared yet" in plan.explain()
    weights = random_expert_weights(SPEC, seed=5)
    prepared = plan.prepare(weights)
    assert sorted(kernels.prepared) == sorted([SMALL, copy, layout, BIG])  # once each
    parts = prepared.parts
    canonical = weights.tensors()
    assert parts[SMALL]["w13"] is canonical["w13"] and parts[BIG]["w13"] is canonical["w13"]
    # the copies equal what SMALL prepared: replaced by it, so held once
    assert parts[copy]["w13"] is canonical["w13"] and parts[copy]["w2"] is canonical["w2"]
    assert parts[layout]["w2"] is canonical["w2"] and parts[layout]["w13"].shape == (8, 48, 80)
    assert len(prepared.tensors) == 3  # w13, w2, and the transposed w13
    nbytes = {k: v.numel() * v.element_size() for k, v in canonical.items()}
    m = plan.memory
    assert m["total"] == 2 * nbytes["w13"] + nbytes["w2"]
    assert m["canonical"] == nbytes["w13"] + nbytes["w2"]
    assert m["per_kernel"] == {k: nbytes["w13"] + nbytes["w2"] for k in (SMALL, copy, layout, BIG)}
    assert m["unshared"] == 4 * (nbytes["w13"] + nbytes["w2"]) and m["shared"] == m["unshared"] - m["total"]
    assert f"memory: prepared weights hold {m['total'] / 2**20:.2f} MiB" in plan.explain()
    for T, kernel in ((1, SMALL), (5, copy), (20, layout), (100, BIG), (3000, layout)):
        kernels.applied.clear()
        x, w, ids = _inputs(T, seed=T)
        out = moe_apply(plan, x, prepared, w, ids)
        assert kernels.applied == [(kernel, T)]
        want = fused_experts_reference(SPEC, x, weights, w, ids, compute_dtype=torch.float64)
        assert relative_error(out, want) <= tolerance(SPEC)


def test_torch_compile_fullgraph_dispatches_inside_the_op(kernels):
    kernels.install(kernels.entry(SMALL, priority=10), kernels.entry(BIG, priority=5))
    plan = moe_plan(SPEC, "cpu", dispatch=_table([SMALL, SMALL, SMALL, BIG, BIG, BIG, BIG]))
    weights = random_expert_weights(SPEC, seed=9)
    prepared = plan.prepare(weights)
    routing = moe_core.RoutingSpec("softmax", 2, renormalize=True)

    def layer(x, logits):
        w, ids = moe_core.select_experts(logits, routing)
        return moe_apply(plan, x, prepared, w, ids)

    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True, dynamic=True)
    for T, kernel in ((3, SMALL), (70, BIG), (5, SMALL)):
        x = torch.randn(T, SPEC.hidden_size)
        logits = torch.randn(T, SPEC.num_experts)
        kernels.applied.clear()
        got = compiled(x, logits)
        assert kernels.applied == [(kernel, T)]
        torch.testing.assert_close(got, layer(x, logits), rtol=0, atol=0)
    x, w, ids = _inputs(7)
    args = (x, w, ids, list(prepared.tensors.values()), plan.handle, prepared.layout_handle)
    torch.library.opcheck(torch.ops.moe_core.moe_apply.default, args)


def test_bad_input_raises_before_any_launch(kernels):
    kernels.install(kernels.entry(SMALL, priority=10), kernels.entry(BIG, priority=5))
    plan = moe_plan(SPEC, "cpu", dispatch=_table([SMALL, SMALL, SMALL, BIG, BIG, BIG, BIG]))
    weights = random_expert_weights(SPEC)
    prepared = plan.prepare(weights)
    x, w, ids = _inputs(40)
    plain = moe_plan(SPEC, "cpu", dispatch=False).prepare(weights)
    bad = [
        ((x.to(torch.bfloat16), prepared, w, ids), "hidden_states has dtype bfloat16"),
        ((x[:, :40], prepared, w, ids), "hidden_states"),
        ((x, prepared, w[:, :1], ids), "topk"),
        ((x, plain, w, ids), f"weights were prepared for {SMALL}, but the plan runs dispatch"),
        ((x, DispatchedWeights.build({SMALL: plain}), w, ids), f"hold no weights for {BIG}"),
    ]
    for args, match in bad:
        with pytest.raises(MoEInputError, match=match):
            moe_apply(plan, *args)
    assert kernels.applied == []


def test_fast_check_takes_a_dispatching_plan(kernels, monkeypatch):
    """A dispatching plan's good calls pass the fast input check (no checks one by one on the hot
    path); prepared weights lacking a part, or moved after a passing call, do not."""
    from moe_core import planner

    kernels.install(kernels.entry(SMALL, priority=10), kernels.entry(BIG, priority=5))
    plan = moe_plan(SPEC, "cpu", dispatch=_table([SMALL, SMALL, SMALL, BIG, BIG, BIG, BIG]))
    weights = random_expert_weights(SPEC)
    prepared = plan.prepare(weights)
    x, w, ids = _inputs(40)
    monkeypatch.setattr(planner, "should_check_values", lambda t: False)  # (as on a GPU)
    assert planner._plain_inputs(plan, x, prepared, w, ids, None)
    plain = moe_plan(SPEC, "cpu", dispatch=False).prepare(weights)
    partial = DispatchedWeights.build({SMALL: plain})
    assert not planner._plain_inputs(plan, x, partial, w, ids, None)
    assert planner._plain_inputs(plan, x, prepared, w, ids, None)
    name = next(iter(prepared.tensors))
    prepared.tensors[name] = prepared.tensors[name].to("meta")  # a new version: checked again
    assert not planner._plain_inputs(plan, x, prepared, w, ids, None)
    with pytest.raises(MoEInputError, match="device"):
        moe_apply(plan, x, prepared, w, ids)
    assert kernels.applied == []


def test_cli_tune_writes_the_dispatch_table(kernels, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_DISPATCH_DIR", str(tmp_path))
    kernels.standard()
    assert (
        main(["tune", "--model", "tiny-mixtral", "--dtype", "fp32", "--tokens", "1,100", "--kernels", "fake"])
        == 0
    )
    out, err = capsys.readouterr()
    paths = json.loads(out)["dispatch"]
    assert paths and paths[0].startswith(str(tmp_path))
    assert f"T 1          {SMALL}" in err and f"T 33-128     {BIG}" in err
    assert main(["tune", "--model", "tiny-mixtral", "--no-dispatch"]) == 1


def _dense_apply(spec, x, prepared, w, ids, out):
    """Every expert on every token, weighted by the routing: no host sync, so CUDA-graph safe."""
    w13, w2 = prepared["w13"].float(), prepared["w2"].float()
    coef = torch.zeros(x.shape[0], spec.num_experts, device=x.device).scatter_add_(1, ids.long(), w.float())
    h = torch.einsum("th,enh->etn", x.float(), w13)
    inter = spec.intermediate_size
    act = torch.nn.functional.silu(h[..., :inter]) * h[..., inter:]
    y = torch.einsum("eti,ehi->eth", act, w2)
    out.copy_(torch.einsum("eth,te->th", y, coef))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tune_and_cuda_graphs_dispatch_per_captured_shape(kernels):
    spec = SPEC.replace(dtype=torch.bfloat16)
    a, b = "fake.dense_a.experts", "fake.dense_b.experts"
    kernels.install(
        kernels.entry(a, apply=_dense_apply, capability="gpu", priority=10),
        kernels.entry(b, apply=_dense_apply, capability="gpu", priority=5),
    )
    table = dp.tune_dispatch(spec, "cuda", tokens=(1, 100), kernels=["fake"], iters=5, save=False)
    assert table is not None and set(table.distinct()) <= {a, b} and table.kernels[1] is None
    for bucket in (table.buckets[0], table.buckets[3]):
        assert bucket.times.keys() == {a, b}, bucket.excluded
    plan = moe_plan(spec, "cuda", dispatch=_table([a, a, a, b, b, b, b], spec))
    weights = random_expert_weights(spec, device="cuda", seed=1)
    prepared = plan.prepare(weights)
    routing = moe_core.RoutingSpec("softmax", spec.top_k, renormalize=True)
    for T, kernel in ((4, a), (100, b)):
        x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
        w, ids = random_routing(routing, T, spec.num_experts, device="cuda", seed=T)
        torch.cuda.set_sync_debug_mode("error")
        try:
            moe_apply(plan, x, prepared, w, ids)  # the host picks the kernel: no device sync
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        kernels.applied.clear()
        graph, static_out = torch.cuda.CUDAGraph(), torch.empty_like(x)
        with torch.cuda.graph(graph):
            moe_apply(plan, x, prepared, w, ids, out=static_out)
        assert kernels.applied == [(kernel, T)]  # captured: the bucket's kernel, fixed for this shape
        x.copy_(torch.randn_like(x))
        new_w, new_ids = random_routing(routing, T, spec.num_experts, device="cuda", seed=T + 1)
        w.copy_(new_w)
        ids.copy_(new_ids)
        static_out.fill_(float("nan"))
        graph.replay()
        assert torch.equal(static_out, moe_apply(plan, x, prepared, w, ids))
        want = fused_experts_reference(spec, x, weights, w, ids, compute_dtype=torch.float64)
        assert relative_error(static_out, want) <= tolerance(spec)
