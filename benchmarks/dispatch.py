"""Per-token-count dispatch on the GPU: tune it for the bench suite's shapes, then show the tuned plan
is never slower than the best single backend on any case, and its geomean speedup over each one.

    python benchmarks/dispatch.py --out DIR [--quick] [--models a,b] [--tokens 1,8,...]
        [--kernels name-or-prefix,...] [--peers vllm,grouped_mm] [--budget-s 420] [--tolerance 0.05]

Per shape (bf16; BENCHMARKS.md's six, smallest first; ``--quick``: the three smallest):

1. tune: :func:`moe_core.dispatch.tune_dispatch` checks every installed experts kernel
   that supports the shape against the float64 reference and times it at each T
   (one T per bucket: 1, 8, 32, 128, 512, 2048, 8192), as ``moe bench`` times
   (rotated inputs, CUDA events, CUDA graphs for T <= 128); the table is written to
   ``DIR/tables`` (not the user's cache);
2. compare: in a second, independent pass per T (same method, fresh measurements),
   every single backend (a plan forced to that kernel) and the tuned plan
   (``moe_plan(spec, dispatch=table)``, which dispatches on the host by T).

A case passes when ``tuned_us <= best_single_us * (1 + tolerance)``: the tuned plan
runs one of the single backends, so the two are measurements of the same kernel and
differ by noise only; the tolerance (default 5%) says how much noise is accepted.
The summary gives, per single backend, the geomean over cases of
``single_us / tuned_us`` (> 1: the tuned plan is faster).

``--peers`` also registers ``moe bench``'s peers as experts kernels (plugin ``peer``,
priority -10, so the static choice is unchanged), giving dispatch more kernels to choose
from: ``peer.vllm.fused_moe`` (vLLM's Triton fused_moe from ``--vllm-peer`` /
``MOE_BENCH_VLLM``, git-ignored, never committed) and ``peer.torch.grouped_mm``
(``torch._grouped_mm``; it synchronises with the host, so it enters a table only
where no CUDA-graph-safe kernel passed). Their ``apply`` copies the peer's result into
``out`` (one extra ``[T, H]`` copy).

Writes ``DIR/dispatch.json`` (environment, each shape's table, measurements, verdicts)
after every shape, and ``DIR/dispatch.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

import moe_core
from moe_core import KernelEntry, moe_plan
from moe_core.bench.peers import grouped_mm_peer, vllm_peer
from moe_core.bench.suite import SHAPES, TOKENS, _layer_size, _plan_for, environment, select_kernels
from moe_core.dispatch import bucket_index, bucket_label, measure_plans, tune_dispatch
from moe_core.plugins import plugin_manager
from moe_core.presets import get_preset
from moe_core.spec import ExpertWeights

TUNED = "tuned"


def register_peers(names: list[str], vllm_path: str | None) -> dict[str, str]:
    """Register the named peers as experts kernels; returns ``{peer: status}``."""
    peers, status = [], {}
    for name in names:
        if name == "grouped_mm":
            peers.append(("peer.torch.grouped_mm", grouped_mm_peer()))
        elif name == "vllm":
            if not vllm_path:
                status["vllm"] = "skipped: no --vllm-peer PATH or MOE_BENCH_VLLM"
                continue
            try:
                peers.append(("peer.vllm.fused_moe", vllm_peer(vllm_path)))
            except Exception as exc:
                status["vllm"] = f"failed to load: {type(exc).__name__}: {exc}"
                continue
        else:
            raise SystemExit(f"unknown peer {name!r} (vllm, grouped_mm)")
    entries = []
    for kernel, peer in peers:

        def supports(spec, info, peer=peer):
            return "needs a GPU" if not info.is_gpu else peer.supports(spec, info.device)

        def apply(spec, x, prepared, w, ids, out, peer=peer):
            out.copy_(peer.bind(spec, ExpertWeights(**prepared.tensors))(x, w, ids))

        entries.append(
            KernelEntry(
                kernel,
                family="experts",
                apply=apply,
                supports=supports,
                capability="gpu",
                priority=-10,
                description=f"moe bench peer {peer.label}, as a kernel (benchmarks/dispatch.py)",
            )
        )
        status[peer.name] = f"registered as {kernel}"

    class Plugin:
        @moe_core.hookimpl
        def register_kernels(self, register):
            for e in entries:
                register(e)

    if entries:
        record = plugin_manager().load_module("peer", Plugin())
        if record.status != "loaded":
            raise SystemExit(f"could not register the peers: {record.error}")
    return status


def geomean(values: list[float]) -> float | None:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def run_shape(model: str, args: argparse.Namespace, device: torch.device, out: Path) -> dict[str, Any]:
    spec = get_preset(model).moe_spec(torch.bfloat16)
    usable, refused = select_kernels(spec, device, args.kernels)
    shape: dict[str, Any] = {"model": model, "spec": spec.describe(), "kernels": usable, "refused": refused}
    start = time.perf_counter()
    table = tune_dispatch(
        spec, device, tokens=args.tokens, kernels=args.kernels, iters=args.iters, folder=out / "tables"
    )
    shape["tune_s"] = round(time.perf_counter() - start, 1)
    if table is None:
        shape["skipped"] = f"fewer than two kernels support it here ({', '.join(usable) or 'none'})"
        return shape
    shape["table"] = table.to_json()
    tuned = moe_plan(spec, device, dispatch=table)
    plans: dict[str, Any] = {}
    for name in usable:
        try:
            plans[name] = _plan_for(spec, device, name)
        except Exception as exc:
            plans[name] = f"plan raised {type(exc).__name__}: {exc}"
    plans[TUNED] = tuned
    details: dict[int, dict[str, dict[str, Any]]] = {}
    start = time.perf_counter()
    measured, syncs, _ = measure_plans(
        spec, plans, args.tokens, device=device, iters=args.iters or 30, details=details
    )
    shape["compare_s"] = round(time.perf_counter() - start, 1)
    shape["not_graph_safe"] = syncs
    shape["memory"] = tuned.memory
    shape["explain"] = tuned.explain()
    cases = []
    for T in args.tokens:
        row = measured[T]
        singles = {n: us for n, us in row.items() if n != TUNED and isinstance(us, float)}
        tuned_us = row.get(TUNED)
        case: dict[str, Any] = {
            "T": T,
            "bucket": bucket_label(bucket_index(T)),
            "tuned_kernel": tuned.kernel_for(T),
            "tuned_us": tuned_us,
            "single_us": singles,
            "failed": {n: r for n, r in row.items() if not isinstance(r, float)},
            "timing": {
                n: {k: v for k, v in d.items() if not k.endswith("samples_us")}
                for n, d in details.get(T, {}).items()
            },
        }
        if isinstance(tuned_us, float) and singles:
            best = min(singles, key=singles.get)
            case["best_single"] = best
            case["tuned_over_best"] = tuned_us / singles[best]
            case["passed"] = case["tuned_over_best"] <= 1 + args.tolerance
            case["speedup_vs"] = {n: us / tuned_us for n, us in singles.items()}
        else:
            case["passed"] = False
        cases.append(case)
    shape["cases"] = cases
    return shape


def summarize(shapes: list[dict[str, Any]], tolerance: float) -> dict[str, Any]:
    cases = [(s["model"], c) for s in shapes for c in s.get("cases", [])]
    ratios: dict[str, list[float]] = {}
    for _, c in cases:
        for name, r in c.get("speedup_vs", {}).items():
            ratios.setdefault(name, []).append(r)
    geo = {name: geomean(v) for name, v in ratios.items()}
    timed = [mc for mc in cases if "tuned_over_best" in mc[1]]
    worst = max(timed, key=lambda mc: mc[1]["tuned_over_best"], default=None)
    return {
        "cases": len(cases),
        "never_slower": bool(cases) and all(c["passed"] for _, c in cases),
        "tolerance": tolerance,
        "failed_cases": [f"{m} T={c['T']}" for m, c in cases if not c["passed"]],
        "worst": None
        if worst is None
        else {"model": worst[0], "T": worst[1]["T"], "tuned_over_best": worst[1].get("tuned_over_best")},
        "geomean_speedup_vs": geo,
        "cases_per_backend": {name: len(v) for name, v in ratios.items()},
        "strictly_faster_on_geomean_than_every_backend": bool(geo) and all(g > 1 for g in geo.values()),
    }


def markdown(report: dict[str, Any]) -> str:
    s = report["summary"]
    lines = [
        f"# Per-token-count dispatch on {report['environment']['device']}",
        "",
        f"{s['cases']} cases; tuned never slower than the best single backend (tolerance "
        f"{s['tolerance']:.0%}): **{s['never_slower']}**; worst tuned/best = "
        + (
            f"{s['worst']['tuned_over_best']:.3f} ({s['worst']['model']} T={s['worst']['T']})"
            if s["worst"]
            else "-"
        ),
        "",
        "| backend | geomean single/tuned | cases |",
        "|---|---|---|",
    ]
    for name, g in sorted(s["geomean_speedup_vs"].items()):
        lines.append(f"| {name} | {g:.3f} | {s['cases_per_backend'][name]} |")
    for shape in report["shapes"]:
        lines += ["", f"## {shape['model']}: {shape['spec']}", ""]
        if "skipped" in shape or "error" in shape:
            lines.append(shape.get("skipped") or shape.get("error"))
            continue
        names = shape["kernels"]
        lines.append(
            "| T | tuned kernel | tuned us | " + " | ".join(f"{n} us" for n in names) + " | tuned/best |"
        )
        lines.append("|---" * (len(names) + 4) + "|")
        for c in shape["cases"]:
            cells = [
                f"{c['single_us'][n]:.1f}" if n in c["single_us"] else c["failed"].get(n, "-")[:30]
                for n in names
            ]
            tuned = f"{c['tuned_us']:.1f}" if isinstance(c["tuned_us"], float) else str(c["tuned_us"])[:30]
            ratio = f"{c['tuned_over_best']:.3f}" if "tuned_over_best" in c else "-"
            lines.append(
                f"| {c['T']} | {c['tuned_kernel']} | {tuned} | " + " | ".join(cells) + f" | {ratio} |"
            )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", default=None, help="comma list of presets (default: BENCHMARKS.md's six)")
    parser.add_argument("--quick", action="store_true", help="the three smallest shapes")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    parser.add_argument(
        "--kernels", default=None, help="only these experts kernels (names or dotted prefixes)"
    )
    parser.add_argument(
        "--peers", default="vllm", help="peers to register as kernels: vllm,grouped_mm or none"
    )
    parser.add_argument("--vllm-peer", default=os.environ.get("MOE_BENCH_VLLM"))
    parser.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 30)")
    parser.add_argument(
        "--budget-s", type=float, default=420, help="start no new shape after this many seconds"
    )
    parser.add_argument("--tolerance", type=float, default=0.05)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.kernels = [k.strip() for k in args.kernels.split(",")] if args.kernels else None
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peers = [p.strip() for p in args.peers.split(",") if p.strip() and p.strip() != "none"]
    peer_status = register_peers(peers, args.vllm_peer)
    models = args.models.split(",") if args.models else list(SHAPES)
    models = sorted(models, key=lambda m: _layer_size(get_preset(m)))
    if args.quick:
        models = models[:3]
    report: dict[str, Any] = {
        "environment": environment(device),
        "args": {k: v for k, v in vars(args).items()},
        "peers": peer_status,
        "experts_kernels": {
            e.name: e.plugin for e in plugin_manager().registry.entries("experts", "experts")
        },
        "shapes": [],
    }
    start = time.perf_counter()
    for model in models:
        if time.perf_counter() - start > args.budget_s:
            report["shapes"].append(
                {"model": model, "skipped": f"time budget of {args.budget_s:.0f} s spent"}
            )
            continue
        print(f"== {model}", flush=True)
        try:
            shape = run_shape(model, args, device, out)
        except Exception as exc:  # report, go on with the next shape
            shape = {"model": model, "error": f"{type(exc).__name__}: {exc}"[:500]}
        report["shapes"].append(shape)
        for c in shape.get("cases", []):
            ratio = c.get("tuned_over_best")
            print(
                f"  T={c['T']:<5d} tuned {c['tuned_kernel']:<28s} "
                + (f"{c['tuned_us']:9.1f} us" if isinstance(c["tuned_us"], float) else f"{c['tuned_us']}")
                + "".join(f"  {n} {us:.1f}" for n, us in sorted(c["single_us"].items()))
                + (f"  tuned/best {ratio:.3f}" if ratio is not None else "")
                + ("" if c["passed"] else "  FAIL"),
                flush=True,
            )
        if "skipped" in shape or "error" in shape:
            print(f"  {shape.get('skipped') or shape.get('error')}", flush=True)
        report["summary"] = summarize(report["shapes"], args.tolerance)
        report["elapsed_s"] = round(time.perf_counter() - start, 1)
        (out / "dispatch.json").write_text(json.dumps(report, indent=1, default=str))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report["summary"] = summarize(report["shapes"], args.tolerance)
    (out / "dispatch.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "dispatch.md").write_text(markdown(report))
    print(json.dumps(report["summary"], indent=1))
    return 0 if report["summary"]["never_slower"] else 1


if __name__ == "__main__":
    sys.exit(main())
