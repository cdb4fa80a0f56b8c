"""Summarise a ``run_portable.py`` result file as markdown: every case, then the issue's targets.

python benchmarks/summarize.py benchmarks/results/<file>.json > benchmarks/results/<file>.md

A ``moe bench`` file (``bench.json``: cases holding every kernel) is summarised by
``moe_core.bench.report.markdown`` instead.
"""

from __future__ import annotations

import json
import math
import sys
from statistics import geometric_mean


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def summarize(report: dict) -> str:
    if any("kernels" in c for c in report["cases"]):  # a moe bench report
        from moe_core.bench.report import markdown

        return markdown(report)
    cases = [c for c in report["cases"] if "error" not in c]
    v = report["versions"]
    ceil = report["ceilings"]
    lines = [
        f"# portable.triton.fused_moe on {report['device']} ({report['date'][:10]})",
        "",
        f"torch {v['torch']}, CUDA {v['cuda']}, triton {v['triton']}, Python {v['python']}; "
        f"measured ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 GEMM {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s.",
        "Times are medians in us; `best` is the smaller of eager and CUDA-graph replay (graphs for "
        "T <= 128, for ours and for vLLM alike; `torch._grouped_mm` is eager only). Speedups are "
        "peer best / our best.",
        "",
        "| model | dtype | T | eager | graph | best | floor | best/floor | vs grouped_mm | vs vLLM | rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        lines.append(
            f"| {c['model']} | {c['dtype']} | {c['T']} | {c['us']:.1f} | {_fmt(c.get('graph_us'), '.1f')} "
            f"| {c['best_us']:.1f} | {c['floor_us']:.1f} | {c['time_over_floor']:.2f} "
            f"| {_fmt(c.get('speedup_vs_grouped_mm'), '.2f', 'x')} | {_fmt(c.get('speedup_vs_vllm'), '.2f', 'x')} "
            f"| {c['relative_error']:.1e}{'' if c['passed'] else ' FAIL'} |"
        )
    lines += ["", "## Targets (issue: portable 1/2, bf16)", ""]
    bf16 = [c for c in cases if c["dtype"] == "bfloat16"]

    def check(name: str, selected: list[dict], ok) -> None:
        passed = [c for c in selected if ok(c)]
        misses = ", ".join(f"{c['model']} T={c['T']}" for c in selected if not ok(c))
        lines.append(
            f"- {name}: {len(passed)}/{len(selected)} cases" + (f" (missed: {misses})" if misses else "")
        )

    check(
        "time/floor <= 1.3 for T <= 32",
        [c for c in bf16 if c["T"] <= 32],
        lambda c: c["time_over_floor"] <= 1.3,
    )
    check(
        "time/floor <= 1.5 for T >= 128",
        [c for c in bf16 if c["T"] >= 128],
        lambda c: c["time_over_floor"] <= 1.5,
    )
    with_vllm = [c for c in bf16 if "speedup_vs_vllm" in c]
    if with_vllm:
        geo = geometric_mean([c["speedup_vs_vllm"] for c in with_vllm])
        lines.append(
            f"- geomean speedup vs vLLM fused_moe: {geo:.2f}x over {len(with_vllm)} cases (target >= 1.2x)"
        )
        check("never slower than vLLM", with_vllm, lambda c: c["speedup_vs_vllm"] >= 1.0)
    small = [c for c in bf16 if "speedup_vs_grouped_mm" in c and c["T"] <= 512]
    check(
        ">= 2x faster than torch._grouped_mm for T <= 512", small, lambda c: c["speedup_vs_grouped_mm"] >= 2.0
    )
    errors = [c["relative_error"] for c in cases]
    lines.append(
        f"- correctness: {sum(c['passed'] for c in cases)}/{len(cases)} cases within the bound "
        f"(largest relative error {max(errors) if errors else math.nan:.1e})"
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(summarize(json.load(f)), end="")
