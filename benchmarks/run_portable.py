"""Benchmark the portable fused MoE on the GPU against its floor and peers, in one run.

    python benchmarks/run_portable.py --out results.json [--quick] [--dtypes bf16,fp16]
        [--vllm-peer PATH]

For every ../shared/BENCHMARKS.md shape and token count: median time of
``moe_apply`` (CUDA events, warm-up, inputs and weights rotated so that the
L2 cache does not flatter; decode cases also replayed from a CUDA graph),
``time / floor`` with the floor from the copy bandwidth and GEMM rate measured
in the same run, and the ratio to ``torch._grouped_mm`` with a torch sort,
gather and scatter around it (what a user has without this project), and,
when a folder is given with ``--vllm-peer PATH`` or ``MOE_BENCH_VLLM``, the ratio
to vLLM's Triton ``fused_moe`` loaded from that folder (git-ignored, never
committed: it must provide ``fused_moe(x, w1, w2, topk_weights, topk_ids)`` and
``describe()``); without one that peer is recorded as skipped.
Correctness of every timed case is checked against the float64 reference.
Writes one JSON file (device, versions, ceilings, every case) and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch
from timing import events_median, graph_median, rotating

import moe_core
from moe_core.presets import get_preset
from moe_core.reference import fused_experts_reference
from moe_core.testing import random_expert_weights, random_logits, relative_error, tolerance

SHAPES = [
    "mixtral-8x7b",
    "qwen3-30b-a3b",
    "qwen3-235b-a22b-tp8",
    "deepseek-v3-tp8",
    "gpt-oss-120b",
    "gpt-oss-20b",
]
TOKENS = [1, 8, 32, 128, 512, 2048, 8192]
L2_FLUSH_BYTES = 256 * 2**20
#: decode cases (T up to this) are also timed from CUDA graphs, as engines run them
GRAPH_MAX_T = 128


def measure_ceilings() -> dict[str, float]:
    """Device-to-device copy bandwidth (read + write) and dense bf16 GEMM rate."""
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t, _ = events_median(lambda: dst.copy_(src), 20)
    bw = 2 * n / (t * 1e-6)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    t, _ = events_median(lambda: a @ b, 20)
    rate = 2 * 8192**3 / (t * 1e-6)
    return {"copy_bytes_per_s": bw, "bf16_flops_per_s": rate}


def uniform_routing(routing: moe_core.RoutingSpec, T: int, num_experts: int, seed: int):
    """The preset's routing on random logits, without a correction bias: uniform expert load.

    (A random correction bias, as ``moe_core.testing.random_routing`` draws for tests, makes
    DeepSeek's grouped routing pick about 40% fewer distinct experts than the uniform load
    that BENCHMARKS.md's floors assume.)
    """
    logits = random_logits(T, num_experts, device="cuda", seed=seed)
    return moe_core.select_experts(logits, routing)


def floor_us(
    spec: moe_core.MoESpec, num_routed: int, routed_k: int, n_shared: int, T: int, ceil: dict
) -> float:
    """max(bytes / bandwidth, FLOPs / rate) for this layer at T tokens (BENCHMARKS.md)."""
    H, inter = spec.hidden_size, spec.intermediate_size
    active = num_routed * (1 - (1 - routed_k / num_routed) ** T) + n_shared
    elem = spec.dtype.itemsize
    weight_bytes = active * 3 * H * inter * elem
    act_bytes = 2 * T * H * elem
    flops = 2 * T * spec.top_k * 3 * H * inter
    return max((weight_bytes + act_bytes) / ceil["copy_bytes_per_s"], flops / ceil["bf16_flops_per_s"]) * 1e6


def grouped_mm_peer(spec, x, w13_t, w2_t, topk_w, topk_ids):
    """torch._grouped_mm with a torch sort/gather/scatter around it (bf16, SM90)."""
    k = topk_ids.shape[1]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=spec.num_experts)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    tokens = order // k
    a = x[tokens]
    h = torch._grouped_mm(a, w13_t, offs=offs)
    inter = spec.intermediate_size
    act = torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]
    y = torch._grouped_mm(act, w2_t, offs=offs)
    y = y * topk_w.reshape(-1)[order, None].to(y.dtype)
    out = torch.zeros_like(x)
    out.index_add_(0, tokens, y)
    return out


def load_vllm_peer(path: str):
    """Import the vLLM peer package from ``path`` (a folder with ``__init__.py``)."""
    folder = Path(path).resolve()
    spec = importlib.util.spec_from_file_location(
        "moe_bench_vllm_peer", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"no vLLM peer package at {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _time_into(result: dict, prefix: str, fn, copies: int, iters: int, graphs: bool) -> None:
    """Time ``fn(i)`` (input set ``i`` of ``copies``) eagerly and, if ``graphs``, from CUDA graphs.

    Writes ``<prefix>us`` (eager median), ``<prefix>graph_us`` and ``<prefix>best_us`` (the
    smaller) into ``result``; every callable in the comparison is timed the same way.
    """
    call = rotating(fn, copies)
    for _ in range(5):
        call()
    result[prefix + "us"], samples = events_median(call, iters)
    result[prefix + "samples_us"] = samples
    best = result[prefix + "us"]
    if graphs:
        result[prefix + "graph_us"] = graph_median([lambda i=i: fn(i) for i in range(copies)], iters)
        best = min(best, result[prefix + "graph_us"])
    result[prefix + "best_us"] = best


def run_case(model: str, dtype: torch.dtype, T: int, ceil: dict, iters: int, check: bool, vllm=None) -> dict:
    preset = get_preset(model)
    spec = preset.moe_spec(dtype)
    plan = moe_core.moe_plan(spec, "cuda")
    weights = random_expert_weights(spec, device="cuda", seed=1)
    wbytes = sum(t.numel() * t.element_size() for t in weights.tensors().values())
    copies = max(2, math.ceil(L2_FLUSH_BYTES / wbytes))
    prepared = [plan.prepare(weights)]
    for i in range(1, copies):
        prepared.append(plan.prepare(random_expert_weights(spec, device="cuda", seed=1 + i)))
    inputs = []
    for i in range(copies):
        x = torch.randn(T, spec.hidden_size, device="cuda").to(dtype)
        w, ids = uniform_routing(preset.routing, T, preset.num_experts, seed=100 + i)
        inputs.append((x, w, ids))
    out = torch.empty(T, spec.hidden_size, dtype=dtype, device="cuda")
    result = {"model": model, "dtype": str(dtype).removeprefix("torch."), "T": T, "kernel": plan.kernel}
    result["active_experts"] = statistics.mean(len(torch.unique(ids)) for _, _, ids in inputs)
    if check:
        x, w, ids = inputs[0]
        out.fill_(float("nan"))
        moe_core.moe_apply(plan, x, prepared[0], w, ids, out=out)
        want = fused_experts_reference(spec, x, weights, w, ids, compute_dtype=torch.float64)
        result["relative_error"] = relative_error(out, want)
        result["passed"] = result["relative_error"] <= tolerance(spec)

    def ours(i):
        x, w, ids = inputs[i]
        moe_core.moe_apply(plan, x, prepared[i], w, ids, out=out)

    _time_into(result, "", ours, copies, iters, graphs=T <= GRAPH_MAX_T)
    best = result["best_us"]
    routed_k = preset.routing.top_k
    result["floor_us"] = floor_us(
        spec, preset.num_experts, routed_k, preset.routing.num_fused_shared_experts, T, ceil
    )
    result["time_over_floor"] = best / result["floor_us"]
    if dtype == torch.bfloat16 and spec.activation == "silu" and not spec.has_bias:
        peers_w = [(p["w13"].transpose(1, 2), p["w2"].transpose(1, 2)) for p in (q.tensors for q in prepared)]

        def peer(i):
            x, w, ids = inputs[i]
            grouped_mm_peer(spec, x, *peers_w[i], w, ids)

        try:  # eager only: its bincount/cumsum sizes are read on the host, so it cannot be captured
            _time_into(result, "grouped_mm_", peer, copies, iters, graphs=False)
            result["speedup_vs_grouped_mm"] = result["grouped_mm_best_us"] / best
        except Exception as exc:  # report, do not hide
            result["grouped_mm_error"] = f"{type(exc).__name__}: {exc}"[:300]
    if (
        vllm is not None
        and dtype in (torch.bfloat16, torch.float16)
        and not spec.quant.is_quantized
        and spec.activation == "silu"
        and not spec.has_bias
        and spec.ep_size == 1
        and spec.expert_map is None
        and not spec.apply_router_weight_on_input
    ):
        vllm_w = [(p["w13"], p["w2"]) for p in (q.tensors for q in prepared)]

        def vllm_peer(i):
            x, w, ids = inputs[i]
            vllm.fused_moe(x, *vllm_w[i], w, ids)

        try:
            if check:
                x, w, ids = inputs[0]
                got = vllm.fused_moe(x, *vllm_w[0], w, ids)
                result["vllm_relative_error"] = relative_error(got, want)
                result["vllm_passed"] = result["vllm_relative_error"] <= tolerance(spec)
            _time_into(result, "vllm_", vllm_peer, copies, iters, graphs=T <= GRAPH_MAX_T)
            result["speedup_vs_vllm"] = result["vllm_best_us"] / best
        except Exception as exc:  # report, do not hide
            result["vllm_error"] = f"{type(exc).__name__}: {exc}"[:300]
    return result


def _command(argv: list[str]) -> str | None:
    """First line a command prints, or ``None`` if it fails (no git checkout, no nvidia-smi)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[0] if done.returncode == 0 and lines else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and token counts")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument(
        "--vllm-peer",
        default=os.environ.get("MOE_BENCH_VLLM"),
        help="folder of the vLLM fused_moe peer package (default: $MOE_BENCH_VLLM; none: skipped)",
    )
    args = parser.parse_args()
    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16}[d] for d in args.dtypes.split(",")]
    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.quick:
        models, tokens = models[:3], [1, 32, 512, 4096]
    vllm = load_vllm_peer(args.vllm_peer) if args.vllm_peer else None
    ceil = measure_ceilings()
    commit = os.environ.get("MOE_BENCH_COMMIT") or _command(["git", "rev-parse", "--verify", "HEAD"])
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "driver": _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": metadata.version("triton"),
            "moe-core": moe_core.__version__,
            "python": platform.python_version(),
        },
        "git_commit": commit,
        "peers": {
            "vllm": (
                {"status": "loaded", "path": str(Path(args.vllm_peer).resolve()), **vllm.describe()}
                if vllm is not None
                else {"status": "skipped", "reason": "no --vllm-peer PATH or MOE_BENCH_VLLM"}
            )
        },
        "ceilings": ceil,
        "cases": [],
    }
    print(
        f"{report['device']}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s"
    )
    for dtype in dtypes:
        for model in models:
            for T in tokens:
                try:
                    case = run_case(model, dtype, T, ceil, args.iters, check=True, vllm=vllm)
                except Exception as exc:
                    case = {
                        "model": model,
                        "dtype": str(dtype),
                        "T": T,
                        "error": f"{type(exc).__name__}: {exc}"[:500],
                    }
                torch.cuda.empty_cache()
                report["cases"].append(case)
                if vllm is not None:  # config files actually loaded so far
                    report["peers"]["vllm"]["lookups"] = vllm.describe()["lookups"]
                Path(args.out).write_text(json.dumps(report, indent=1))
                if "error" in case:
                    print(f"{model:22s} {case['dtype']:9s} T={T:5d} ERROR {case['error']}")
                    continue
                graph = f"{case['graph_us']:8.1f}" if "graph_us" in case else "       -"
                peer = (
                    f"{case['speedup_vs_grouped_mm']:5.2f}x" if "speedup_vs_grouped_mm" in case else "    -"
                )
                vpeer = f"{case['speedup_vs_vllm']:5.2f}x" if "speedup_vs_vllm" in case else "    -"
                print(
                    f"{model:22s} {case['dtype']:9s} T={T:5d} {case['us']:8.1f} us graph {graph} floor {case['floor_us']:7.1f} "
                    f"x{case['time_over_floor']:5.2f} vs grouped_mm {peer} vs vllm {vpeer} "
                    f"err {case['relative_error']:.1e}" + ("" if case["passed"] else " FAIL")
                )


if __name__ == "__main__":
    main()
