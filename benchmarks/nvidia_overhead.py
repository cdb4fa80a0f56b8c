"""nvidia.flashinfer.cutlass vs a direct FlashInfer call, in one run (GPU; tools/device_nvidia.sh).

For each model and T, on the same prepared weights and inputs:

- ``plugin``: ``moe_apply`` through the plan (tactics from the tune cache when present);
- ``direct``: ``flashinfer.fused_moe.cutlass_fused_moe`` called by hand with the same
  tensors and the same ``profile_ids`` as the plugin (the tune cache's, else FlashInfer's
  defaults ``[-1, -1]``; the plugin's overhead is ``plugin - direct``);
- ``autotuned``: the direct call after FlashInfer's own autotuner ran for this T in
  this process (``profile_ids=None``; the target is plugin <= 1.05x of it);
- ``untuned``: the direct call with FlashInfer's default tactic (no cache, no tuner).

Host time per eager call (``host_us``, T <= 8) from back-to-back calls, and ``host_noop``:
the host time of the plugin's call and of the direct call's argument handling with
FlashInfer's function replaced by a no-op (what this package itself costs), and
``host_captured``: the real call made with the arguments recorded from a plugin call (and
which of them differ from the direct call's); ``--profile`` adds a cProfile of the plugin's
and of the direct call there. Eager medians from CUDA events, the labels timed in alternating order over ``--rounds``
rounds (ABC, CBA, ...; the best round's median is kept, so clock and cache drift over
a case fall on every label alike); decode cases (T <= 128) also from CUDA-graph replay.
fp8_block has one tactic (FlashInfer's DeepGEMM path): no autotuned or untuned call.
mxfp4 with ``H % 128 != 0``: the direct call takes the same padded input into a padded
output (what a caller of FlashInfer does), the plugin also copies the result into ``out``.
Writes one JSON (``--out``) with every time, the floor (moe_core.bench.floors) and
the ratios. Targets: overhead <= max(3%, 5 us) on every case.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from moe_core import moe_apply, moe_plan
from moe_core.bench.floors import measure_ceilings, preset_floor_us
from moe_core.bench.suite import uniform_routing
from moe_core.bench.timing import graph_times, median_us, rotating
from moe_core.presets import get_preset
from moe_core.testing import random_expert_weights

KERNEL = "nvidia.flashinfer.cutlass"


#: ``--quant`` names: what FlashInfer's SM90 cutlass path takes (fp8: per-tensor weights, static activations)
QUANTS = {
    "bf16": None,
    "fp16": None,  # float16 activations and weights
    "fp8": "fp8/w:per_tensor/a:fp8_per_tensor",
    "fp8_block": "fp8_block",
    "mxfp4": "mxfp4",
}


#: The timed calls (bench_case), in the order of the summary line.
LABELS = ("plugin", "direct", "autotuned", "untuned", "plugin_public", "direct_module")
#: Up to this many tokens the host time per eager call is also measured (``host_us``).
HOST_TOKENS = 8


def _profile(call, n: int = 300, top: int = 25) -> str:
    """cProfile of ``n`` eager calls: the ``top`` entries by own time, as text."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()[-6000:]


def _host_noop(plugin, kws, spec, inputs, prepared, n: int = 2000) -> dict:
    """Host us per call with FlashInfer's function replaced by a no-op: ``plugin`` (moe_apply:
    the core's checks and the plugin's translation), ``direct`` (the benchmark's own argument
    handling for the direct call) and their difference (what this package adds per call)."""
    from moe_plugin_nvidia import cutlass

    def noop(**kw):
        return None

    def direct(i):
        noop(**dict(kws[i], input=cutlass.kernel_input(spec, inputs[i][0], prepared)))

    real = cutlass._flashinfer
    cutlass._flashinfer = lambda: (noop, None)
    try:
        result = _host_us({"plugin": plugin, "direct": direct}, n, copies=2)
    finally:
        cutlass._flashinfer = real
    result["added"] = result["plugin"] - result["direct"]
    return result


def _captured(plugin, kws, n: int = 1000) -> dict:
    """The real call with the keyword arguments the plugin passed (recorded from one plugin call):
    which of them differ from the direct call's (``differs``, by identity for tensors), and the
    host us per call of ``plugin``, ``direct`` and ``captured`` (the direct call made with the
    plugin's arguments): tells the plugin's own cost from a difference in what FlashInfer is given."""
    from moe_plugin_nvidia import cutlass

    real = cutlass._flashinfer
    fn = real()[0]
    seen: list[dict] = []

    def record(**kw):
        seen.append(kw)
        return fn(**kw)

    cutlass._flashinfer = lambda: (record, None)
    try:
        plugin(0)
    finally:
        cutlass._flashinfer = real
    got = seen[0]
    want = kws[0]

    def same(a, b):
        return a is b if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) else a == b

    differs = sorted(
        k for k in set(got) | set(want) if k not in got or k not in want or not same(got[k], want[k])
    )
    calls = {"plugin": plugin, "direct": lambda i: fn(**kws[0]), "captured": lambda i: fn(**got)}
    result: dict = {"differs": {k: [repr(got.get(k))[:80], repr(want.get(k))[:80]] for k in differs}}
    return {**result, **_host_us(calls, n, copies=1)}


def _host_us(calls: dict, n: int, copies: int) -> dict[str, float]:
    """Host us per call of each ``calls[label](i)``: ``n`` back-to-back calls on inputs
    ``i = k % copies``, one sync at the end; the labels twice in turn, the best of the two kept."""
    result: dict[str, float] = {}
    for label, call in list(calls.items()) * 2:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for k in range(n):
            call(k % copies)
        us = (time.perf_counter() - t0) / n * 1e6
        torch.cuda.synchronize()
        result[label] = min(us, result.get(label, us))
    return result


def _module_labels(spec, plan, weights, kws, inputs, out, prepared, case) -> list:
    """``plugin_public`` (the plugin with ``MOE_NVIDIA_MODULE_CALL=0``, FlashInfer's public call, on
    its own prepared copy of the weights) and ``direct_module`` (FlashInfer's compiled-module entry
    called by hand with the direct call's arguments), where this FlashInfer's entry is taken
    (``cutlass.module_entry``); ``module_call`` says whether the ``plugin`` label made the module call."""
    from moe_plugin_nvidia import cutlass

    try:
        case["module_call"] = prepared.cache[cutlass.KERNEL][1][4] is not None
        entry = cutlass.module_entry(torch.device("cuda", torch.cuda.current_device()), kws[0])
        if entry is None or not case["module_call"]:
            return []
        prepared_p = plan.prepare(weights)
        x, w, ids = inputs[0]
        want = moe_apply(plan, x, prepared, w, ids).float()
        saved = os.environ.get("MOE_NVIDIA_MODULE_CALL")
        os.environ["MOE_NVIDIA_MODULE_CALL"] = "0"
        try:  # the first call builds the layer call with the public function
            got = moe_apply(plan, x, prepared_p, w, ids).float()
        finally:
            if saved is None:
                del os.environ["MOE_NVIDIA_MODULE_CALL"]
            else:
                os.environ["MOE_NVIDIA_MODULE_CALL"] = saved
        # the module call against the public one (FlashInfer's fused finalize sums with atomics: not bitwise)
        case["module_rel_diff"] = float((want - got).norm() / got.norm().clamp_min(1e-30))
    except Exception as exc:  # report, do not lose the case
        case["module_call"] = f"{type(exc).__name__}: {exc}"[:300]
        return []

    def plugin_public(i):
        x, w, ids = inputs[i]
        moe_apply(plan, x, prepared_p, w, ids, out=out)

    def direct_module(i):
        entry(**dict(kws[i], input=cutlass.kernel_input(spec, inputs[i][0], prepared)))

    return [("plugin_public", plugin_public), ("direct_module", direct_module)]


def bench_case(
    model: str,
    T: int,
    iters: int,
    ceilings: dict,
    autotune_direct: bool,
    quant: str = "bf16",
    rounds: int = 2,
    profile: bool = False,
) -> dict:
    from flashinfer import autotune
    from flashinfer.fused_moe import ActivationType, cutlass_fused_moe

    from moe_plugin_nvidia import cutlass, tuning

    preset = get_preset(model)
    spec = preset.moe_spec(torch.float16 if quant == "fp16" else torch.bfloat16, QUANTS[quant])
    plan = moe_plan(spec, "cuda", backend=KERNEL)
    weights = random_expert_weights(spec, device="cuda", seed=1)
    prepared = plan.prepare(weights)
    copies = 2
    inputs = []
    for i in range(copies):
        x = torch.randn(T, spec.hidden_size, device="cuda").to(spec.dtype)
        w, ids = uniform_routing(preset.routing, T, preset.num_experts, device="cuda", seed=100 + i)
        inputs.append((x, w.float().contiguous(), ids.int().contiguous()))
    out = torch.empty(T, spec.hidden_size, dtype=spec.dtype, device="cuda")
    width = cutlass.kernel_input(spec, inputs[0][0], prepared).shape[1]  # mxfp4: padded to 128
    out_k = out if width == spec.hidden_size else torch.empty(T, width, dtype=spec.dtype, device="cuda")
    act = ActivationType(prepared.meta["activation"])
    single = spec.quant.name == "fp8_block"  # one tactic: nothing to tune
    name = torch.cuda.get_device_name()
    ids_tuned = tuning.lookup(spec, name, T)
    ids_plugin = ids_tuned if ids_tuned is not None else cutlass.DEFAULT_TACTICS  # what the plugin passes
    # FlashInfer's input: fp8 quantized for fp8 (a bf16 input with fp8 weights is another runner)
    kws = [
        cutlass.flashinfer_kwargs(
            spec, cutlass.kernel_input(spec, x, prepared), prepared, w, ids, out_k, act, ids_plugin
        )
        for x, w, ids in inputs
    ]

    def plugin(i):
        x, w, ids = inputs[i]
        moe_apply(plan, x, prepared, w, ids, out=out)

    def direct(i):  # fp8: quantizing the input is part of the call, as for the plugin
        cutlass_fused_moe(**dict(kws[i], input=cutlass.kernel_input(spec, inputs[i][0], prepared)))

    untuned_kws = [dict(kw, profile_ids=[-1, -1]) for kw in kws]

    def untuned(i):
        cutlass_fused_moe(**untuned_kws[i])

    case = {
        "model": model,
        "quant": quant,
        "T": T,
        "spec": spec.describe(),
        "tuned": ids_tuned,
        "floor_us": preset_floor_us(preset, spec, T, ceilings),
    }

    def timed(label, fn, graphs):
        call = rotating(fn, copies)
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        r = case.setdefault(label, {"rounds_us": []})
        r["rounds_us"].append(median_us(call, iters, "cuda")[0])
        r["us"] = min(r["rounds_us"])
        if graphs and T <= 128:
            try:
                g, _ = graph_times([lambda i=i, fn=fn: fn(i) for i in range(copies)], iters)
                r["graph_us"] = min(g, r.get("graph_us", g))
            except Exception as exc:  # report, do not hide
                r["graph_error"] = f"{type(exc).__name__}: {exc}"[:300]
        if T <= HOST_TOKENS:  # host time per eager call: back-to-back calls, one sync at the end
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                call()
            host = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            r["host_us"] = min(host, r.get("host_us", host))

    t0 = time.monotonic()
    plugin(0)  # first call: fp8_block compiles its DeepGEMM kernels here (nvcc, cached on disk)
    torch.cuda.synchronize()
    case["first_call_s"] = round(time.monotonic() - t0, 2)
    # Before FlashInfer's own autotuner runs in this process (its in-memory cache would leak into
    # the calls that pass profile_ids=None).
    labels = [("plugin", plugin), ("direct", direct)] + ([] if single else [("untuned", untuned)])
    labels += _module_labels(spec, plan, weights, kws, inputs, out, prepared, case)
    for r in range(max(1, rounds)):
        for label, fn in labels if r % 2 == 0 else labels[::-1]:
            timed(label, fn, True)
    if autotune_direct and not single:
        auto_kws = [dict(kw, profile_ids=None) for kw in kws]
        t0 = time.monotonic()
        with autotune(True, tuning_buckets=(T,)):
            cutlass_fused_moe(**auto_kws[0])
        torch.cuda.synchronize()
        case["autotune_s"] = round(time.monotonic() - t0, 1)

        def autotuned(i):
            with autotune(False, tuning_buckets=(T,)):
                cutlass_fused_moe(**auto_kws[i])

        timed("autotuned", autotuned, False)  # the autotune context is Python-side state: no graphs
    if T <= HOST_TOKENS:
        case["host_noop"] = _host_noop(plugin, kws, spec, inputs, prepared)
        try:
            case["host_captured"] = _captured(plugin, kws)
        except Exception as exc:  # report, do not lose the case
            case["host_captured"] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    if profile and T <= HOST_TOKENS:
        case["profile"] = _profile(rotating(plugin, copies))
        case["profile_direct"] = _profile(rotating(direct, copies))
    p, d = case["plugin"]["us"], case["direct"]["us"]
    if "plugin_public" in case:  # the plugin's public call against the direct one and the plugin's default
        case["public_over_direct_us"] = case["plugin_public"]["us"] - d
        case["public_over_plugin_us"] = case["plugin_public"]["us"] - p
    case["overhead_us"] = p - d
    case["overhead_pct"] = 100.0 * (p - d) / d
    case["overhead_ok"] = (p - d) <= max(0.03 * d, 5.0)
    if "graph_us" in case["plugin"] and "graph_us" in case["direct"]:
        case["graph_overhead_us"] = case["plugin"]["graph_us"] - case["direct"]["graph_us"]
    if "autotuned" in case:
        case["plugin_over_autotuned"] = p / case["autotuned"]["us"]
    case["plugin_over_floor"] = min(p, case["plugin"].get("graph_us", p)) / case["floor_us"]
    if "untuned" in case:
        case["untuned_over_plugin"] = case["untuned"]["us"] / p
    return case


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mixtral-8x7b,qwen3-30b-a3b")
    ap.add_argument("--tokens", default="1,32,512,4096")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--quant", default="bf16", help=f"comma list of {', '.join(QUANTS)}")
    ap.add_argument("--no-autotune", action="store_true", help="skip the directly autotuned FlashInfer call")
    ap.add_argument(
        "--rounds", type=int, default=2, help="rounds of plugin/direct/untuned in alternating order"
    )
    ap.add_argument(
        "--profile",
        action="store_true",
        help=f"cProfile of the plugin and the direct call at T <= {HOST_TOKENS}",
    )
    ap.add_argument("--out", default="nvidia-overhead.json")
    args = ap.parse_args(argv)
    ceilings = measure_ceilings("cuda")
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "ceilings": ceilings,
        "cases": [],
    }
    try:
        import flashinfer

        report["flashinfer"] = flashinfer.__version__
    except ImportError:
        print("flashinfer is not installed", file=sys.stderr)
        return 2
    grid = [
        (q, m, int(t))
        for q in args.quant.split(",")
        for m in args.models.split(",")
        for t in args.tokens.split(",")
    ]
    for quant, model, T in grid:
        try:
            case = bench_case(
                model, T, args.iters, ceilings, not args.no_autotune, quant, args.rounds, args.profile
            )
        except Exception as exc:  # report, do not stop the run
            case = {"model": model, "quant": quant, "T": T, "error": f"{type(exc).__name__}: {exc}"[:500]}
        report["cases"].append(case)
        keys = (
            "overhead_us",
            "overhead_pct",
            "plugin_over_autotuned",
            "plugin_over_floor",
            "public_over_plugin_us",
            "error",
        )
        print(
            json.dumps(
                {
                    "model": model,
                    "quant": quant,
                    "T": T,
                    **{k: case.get(k) for k in keys},
                    **{k: case[k]["us"] for k in LABELS if k in case},
                }
            ),
            flush=True,
        )
        torch.cuda.empty_cache()
        with open(args.out, "w") as f:  # after every case: a time limit keeps what was measured
            json.dump(report, f, indent=1)
    bad = [c for c in report["cases"] if "error" in c or not c.get("overhead_ok")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
