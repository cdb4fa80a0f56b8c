"""Benchmark the portable fused MoE on the GPU against its floor and peers: ``moe bench`` narrowed to it.

    python benchmarks/run_portable.py --out results.json [--quick] [--dtypes bf16,fp16]
        [--models a,b] [--tokens 1,8,...] [--iters N] [--vllm-peer PATH] [--quant fp8,fp8_block,mxfp4]

A thin wrapper over :mod:`moe_core.bench` (``moe bench --kernels portable.triton.fused_moe``)
that writes this script's historical flat JSON, one case per (dtype, model, T), read by
``benchmarks/summarize.py``: ``us`` (eager median of CUDA events, inputs and weights
rotated against the L2 cache), ``graph_us`` (CUDA-graph replay, T <= 128), ``best_us``,
``floor_us`` and ``time_over_floor`` (../shared/BENCHMARKS.md's floor from the copy
bandwidth and GEMM rate measured in the same run), ``relative_error``/``passed``
(against the float64 reference), ``active_experts``, ``samples_us``, and per peer
(``torch._grouped_mm`` with a torch sort/gather/scatter; vLLM's Triton ``fused_moe``
loaded from ``--vllm-peer PATH`` or ``MOE_BENCH_VLLM``, else recorded as skipped)
``<peer>_us``, ``<peer>_graph_us``, ``<peer>_best_us``, ``<peer>_samples_us`` and
``speedup_vs_<peer>``. ``moe bench`` itself times every kernel at once.

``--quant`` adds quantized cases (scheme names: fp8 = per-channel weights with per-token
activations, fp8_block, mxfp4 = W4A16 (bf16 only: use ``--dtypes bf16``)) after the
unquantized ones of each model; their floors count the quantized weight bytes (``moe_core.bench.floors``), and their
peer is this kernel unquantized on the same model, dtype and T in the same run
(``unquantized_best_us``, ``speedup_vs_unquantized``).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from moe_core.bench import report as bench_report
from moe_core.bench.suite import QUICK_TOKENS, SHAPES, TOKENS, BenchConfig, run_bench

KERNEL = "portable.triton.fused_moe"
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_TIMES = ("us", "samples_us", "graph_us", "graph_samples_us", "best_us")


def flatten(case: dict[str, Any], kernel: str = KERNEL) -> dict[str, Any]:
    """One ``moe bench`` case as this script's flat record for ``kernel``."""
    out: dict[str, Any] = {
        "model": case["model"],
        "dtype": case["dtype"],
        "quant": case.get("quant"),
        "T": case["T"],
    }
    if "error" in case:
        return {**out, "error": case["error"]}
    result = case["kernels"].get(kernel)
    if result is None:
        reason = case.get("refused", {}).get(kernel, "not registered")
        return {**out, "error": f"{kernel} does not run this case: {reason}"}
    out["kernel"] = kernel
    out["active_experts"] = case.get("active_experts")
    for key in ("relative_error", "passed", *_TIMES, "graph_skipped", "graph_error", "error"):
        if key in result:
            out[key] = result[key]
    out["floor_us"] = case["floor_us"]
    if "best_us" in result:
        out["time_over_floor"] = result["time_over_floor"]
    for name, peer in case.get("peers", {}).items():
        if "skipped" in peer:
            continue
        if "error" in peer:
            out[f"{name}_error"] = peer["error"]
            continue
        for key in (*_TIMES, "relative_error", "passed"):
            if key in peer:
                out[f"{name}_{key}"] = peer[key]
        if f"speedup_vs_{name}" in result:
            out[f"speedup_vs_{name}"] = result[f"speedup_vs_{name}"]
    return out


def flat_report(report: dict[str, Any], kernel: str = KERNEL) -> dict[str, Any]:
    """The whole report in this script's format (header fields kept, cases flattened)."""
    keep = ("date", "device", "capability", "driver", "versions", "git_commit", "peers", "ceilings")
    cases = [flatten(c, kernel) for c in report["cases"]]
    plain = (None, "bf16", "fp16", "fp32")
    unquantized = {
        (c["model"], c["dtype"], c["T"]): c["best_us"]
        for c in cases
        if c.get("quant") in plain and "best_us" in c
    }
    for c in cases:  # a quantized case's peer: the same kernel unquantized, same model, dtype and T
        base = unquantized.get((c["model"], c["dtype"], c["T"]))
        if base is not None and "best_us" in c and c.get("quant") not in plain:
            c["unquantized_best_us"] = base
            c["speedup_vs_unquantized"] = base / c["best_us"]
    return {**{k: report[k] for k in keep}, "cases": cases}


def _line(case: dict[str, Any]) -> str:
    head = f"{case['model']:22s} {case['dtype']:9s} {case.get('quant') or '':9s} T={case['T']:5d}"
    if "best_us" not in case:
        return f"{head} ERROR {case.get('error')}"
    graph = f"{case['graph_us']:8.1f}" if "graph_us" in case else "       -"
    peer = f"{case['speedup_vs_grouped_mm']:5.2f}x" if "speedup_vs_grouped_mm" in case else "    -"
    vpeer = f"{case['speedup_vs_vllm']:5.2f}x" if "speedup_vs_vllm" in case else "    -"
    upeer = (
        f" vs unquantized {case['speedup_vs_unquantized']:5.2f}x" if "speedup_vs_unquantized" in case else ""
    )
    return (
        f"{head} {case['us']:8.1f} us graph {graph} floor {case['floor_us']:7.1f} "
        f"x{case['time_over_floor']:5.2f} vs grouped_mm {peer} vs vllm {vpeer}{upeer} "
        f"err {case['relative_error']:.1e}" + ("" if case["passed"] else " FAIL")
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="the 3 smallest shapes at T = 1, 32, 512, 4096")
    parser.add_argument("--dtypes", default="bf16,fp16")
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--kernel", default=KERNEL, help="the experts kernel to time (default: %(default)s)")
    parser.add_argument(
        "--quant", default="", help="quant schemes to add with the first dtype: fp8,fp8_block,mxfp4"
    )
    parser.add_argument(
        "--vllm-peer",
        default=os.environ.get("MOE_BENCH_VLLM"),
        help="folder of the vLLM fused_moe peer package (default: $MOE_BENCH_VLLM; none: skipped)",
    )
    args = parser.parse_args(argv)
    from moe_core.bench.suite import quick_models

    models = args.models.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.quick:
        models, tokens = quick_models(models), QUICK_TOKENS
    config = BenchConfig(
        models=models,
        tokens=tokens,
        dtypes=[_DTYPES[d] for d in args.dtypes.split(",")],
        quants=[None, *(q for q in args.quant.split(",") if q)],
        kernels=[args.kernel],
        iters=args.iters,
        device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
        vllm_peer=args.vllm_peer,
    )

    def save(report: dict, case: dict) -> None:
        if len(report["cases"]) == 1:
            ceil = report["ceilings"]
            print(
                f"{report['device']}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
                f"bf16 GEMM {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s"
            )
        flat = flat_report(report, args.kernel)
        bench_report.write_json(flat, args.out)
        print(_line(flat["cases"][-1]), flush=True)

    run_bench(config, on_case=save)


if __name__ == "__main__":
    main()
