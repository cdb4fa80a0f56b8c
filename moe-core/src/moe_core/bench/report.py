"""The ``moe bench`` report: JSON, a markdown summary, a rich table and one plot per shape.

The JSON (``bench.json``) holds ``date``, ``device``, ``device_type``, ``capability``,
``driver`` (nvidia-smi; ``None`` without one), ``versions`` (torch, cuda, hip, triton,
flashinfer, moe-core, the plugins, python; ``None`` when absent), ``git_commit``,
``config``, ``kernels`` (every registered experts kernel and its plugin), ``peers``
(each peer's status), ``ceilings`` (``copy_bytes_per_s``, ``bf16_flops_per_s``,
``fp8_flops_per_s`` where measured) and ``cases``. A case has ``model``, ``dtype``,
``quant``, ``T``, ``spec``, ``tolerance``, ``floor_us``, ``active_experts``,
``refused`` (kernel: reason), ``fastest`` (the fastest kernel that passed), and
``kernels`` / ``peers``: name -> ``us`` (eager median), ``samples_us``, ``graph_us`` and
``graph_samples_us`` (CUDA graphs, T <= 128; or ``graph_skipped``/``graph_error``), ``best_us``,
``time_over_floor``, ``relative_error``, ``passed``, ``speedup_vs_<peer>`` (kernels),
``error`` (a kernel that raised) or ``skipped`` (a peer that does not run the case).
A case that could not be set up has ``error`` instead.

matplotlib is optional: :func:`plot` is skipped, with a message, without it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["failures", "markdown", "plot", "print_table", "rows", "write_json"]

_PEER_LABELS = {
    "grouped_mm": "torch._grouped_mm",
    "scaled_grouped_mm": "torch._scaled_grouped_mm",
    "vllm": "vllm.fused_moe",
}


def _vs_torch(r: dict) -> float | None:
    """The speedup over the torch peer of the case (bf16: ``_grouped_mm``; fp8: ``_scaled_grouped_mm``)."""
    value = r.get("speedup_vs_grouped_mm")
    return value if value is not None else r.get("speedup_vs_scaled_grouped_mm")


def write_json(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    return path


def rows(report: dict) -> Iterator[dict[str, Any]]:
    """One row per (case, kernel or peer) that ran: the case's keys plus the result's and ``name``, ``peer``."""
    for case in report["cases"]:
        if "error" in case:
            continue
        base = {k: case[k] for k in ("model", "dtype", "quant", "T", "floor_us")}
        for name, result in case.get("kernels", {}).items():
            yield {**base, **result, "name": name, "peer": False}
        for name, result in case.get("peers", {}).items():
            if "skipped" not in result:
                yield {**base, **result, "name": _PEER_LABELS.get(name, name), "peer": True}


def failures(report: dict) -> list[str]:
    """Kernel results that failed the reference check or raised, and cases that could not run."""
    found = []
    for case in report["cases"]:
        where = f"{case['model']} {case['dtype']} {case.get('quant')} T={case['T']}"
        if "error" in case:
            found.append(f"{where}: {case['error']}")
            continue
        for name, r in case.get("kernels", {}).items():
            if "error" in r:
                found.append(f"{where} {name}: {r['error']}")
            elif not r.get("passed"):
                found.append(
                    f"{where} {name}: relative error {r['relative_error']:.2e} > {case['tolerance']:.1e}"
                )
    return found


def _fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:{spec}}{suffix}"


def _header(report: dict) -> list[str]:
    v, ceil = report["versions"], report["ceilings"]
    versions = ", ".join(f"{k} {v[k]}" for k in ("torch", "cuda", "hip", "triton", "flashinfer") if v.get(k))
    rates = f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 GEMM {ceil['bf16_flops_per_s'] / 1e12:.1f} TFLOP/s"
    if ceil.get("fp8_flops_per_s"):
        rates += f", fp8 GEMM {ceil['fp8_flops_per_s'] / 1e12:.0f} TFLOP/s"
    return [
        f"# moe bench on {report['device']} ({report['date'][:10]})",
        "",
        f"{versions}; driver {report.get('driver') or '-'}; commit {report.get('git_commit') or '-'}.",
        f"Measured ceilings: {rates}.",
    ]


def markdown(report: dict) -> str:
    """Every kernel and peer per case, the fastest kernel per case, and the failures."""
    lines = _header(report)
    lines += [
        "Times are medians in us; `best` is the smaller of eager and CUDA-graph replay (graphs for "
        "T <= 128 on a GPU, for kernels and peers alike, except the torch peers: eager only). "
        "`floor` is ../shared/BENCHMARKS.md's max(bytes / bandwidth, FLOPs / rate); speedups are "
        "peer best / kernel best; `rel. err` is against the float64 reference.",
        "",
        "| model | dtype | quant | T | kernel | eager | graph | best | floor | best/floor "
        "| vs torch | vs vLLM | rel. err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows(report):
        name = f"*{r['name']}* (peer)" if r["peer"] else r["name"]
        if "error" in r and "best_us" not in r:
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r['quant']} | {r['T']} | {name} | ERROR: "
                f"{r['error'][:120]} | | | | | | | |"
            )
            continue
        err = "-" if "relative_error" not in r else f"{r['relative_error']:.1e}"
        if "passed" in r and not r["passed"]:
            err += " FAIL"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r['quant']} | {r['T']} | {name} | {_fmt(r.get('us'))} "
            f"| {_fmt(r.get('graph_us'))} | {_fmt(r.get('best_us'))} | {r['floor_us']:.1f} "
            f"| {_fmt(r.get('time_over_floor'), '.2f')} | {_fmt(_vs_torch(r), '.2f', 'x')} "
            f"| {_fmt(r.get('speedup_vs_vllm'), '.2f', 'x')} | {err} |"
        )
    lines += [
        "",
        "## Fastest kernel per case (that passed the check)",
        "",
        "| model | dtype | quant | T | kernel | best | best/floor |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in report["cases"]:
        if "error" in case or not case.get("fastest"):
            continue
        r = case["kernels"][case["fastest"]]
        lines.append(
            f"| {case['model']} | {case['dtype']} | {case['quant']} | {case['T']} | {case['fastest']} "
            f"| {r['best_us']:.1f} | {r['time_over_floor']:.2f} |"
        )
    checked = [r for r in rows(report) if not r["peer"]]
    passed = sum(bool(r.get("passed")) for r in checked)
    lines += ["", f"Correctness: {passed}/{len(checked)} kernel results within the bound."]
    bad = failures(report)
    if bad:
        lines += ["", "## Failures", ""] + [f"- {b}" for b in bad]
    return "\n".join(lines) + "\n"


def print_table(report: dict, console: Any = None) -> None:
    """The per-case table on the terminal (rich when installed, else the markdown)."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown(report), end="")
        return
    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file: wide enough for every column
            console = Console(width=max(console.width, 180))
    table = Table(title=f"moe bench on {report['device']}", show_lines=False)
    for col in (
        "model",
        "dtype",
        "quant",
        "T",
        "kernel",
        "best us",
        "floor us",
        "x floor",
        "vs torch",
        "vs vLLM",
        "rel. err",
    ):
        table.add_column(col, justify="left" if col in ("model", "dtype", "quant", "kernel") else "right")
    for r in rows(report):
        if "best_us" not in r:
            table.add_row(
                r["model"],
                r["dtype"],
                r["quant"],
                str(r["T"]),
                r["name"],
                "[red]error[/red]",
                "",
                "",
                "",
                "",
                "",
            )
            continue
        err = "-" if "relative_error" not in r else f"{r['relative_error']:.1e}"
        if "passed" in r and not r["passed"]:
            err = f"[red]{err} FAIL[/red]"
        table.add_row(
            r["model"],
            r["dtype"],
            r["quant"],
            str(r["T"]),
            f"[dim]{r['name']}[/dim]" if r["peer"] else r["name"],
            f"{r['best_us']:.1f}",
            f"{r['floor_us']:.1f}",
            _fmt(r.get("time_over_floor"), ".2f"),
            _fmt(_vs_torch(r), ".2f", "x"),
            _fmt(r.get("speedup_vs_vllm"), ".2f", "x"),
            err,
        )
    console.print(table)


def _filename(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", model) + ".png"


def plot(report: dict, out_dir: str | Path) -> tuple[list[Path], str | None]:
    """One PNG per shape: time / floor against T (log), one line per kernel and peer.

    Returns the files written and, when nothing could be plotted, why (matplotlib missing).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots (pip install matplotlib)"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    by_model: dict[str, dict[str, list[tuple[int, float]]]] = {}
    variants: dict[str, set[tuple[str, str]]] = {}
    for r in rows(report):
        variants.setdefault(r["model"], set()).add((r["dtype"], r["quant"]))
    for r in rows(report):
        if r.get("time_over_floor") is None:
            continue
        label = r["name"] + (" (peer)" if r["peer"] else "")
        if len(variants[r["model"]]) > 1:
            label += f" [{r['dtype']}, {r['quant']}]"
        by_model.setdefault(r["model"], {}).setdefault(label, []).append((r["T"], r["time_over_floor"]))
    written = []
    for model, lines in by_model.items():
        fig, ax = plt.subplots(figsize=(8, 5))
        for label, points in sorted(lines.items()):
            points.sort()
            style = "--" if "(peer)" in label else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=label)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens T")
        ax.set_ylabel("time / floor (1.0 is the limit)")
        ax.set_title(f"{model} on {report['device']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / _filename(model)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written, None
