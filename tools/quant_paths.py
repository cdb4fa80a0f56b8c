"""On the GPU: each path and variant of portable.triton.fused_moe on quantized layers, L2-cold.

    python tools/quant_paths.py [--models deepseek-v3-tp8,gpt-oss-120b] [--quant fp8,mxfp4]
        [--tokens 1,8] [--copies 8] [--out DIR] [--from-json quant_paths.json]

Per layer (model x scheme) and ``T``, for each variant (environment settings of the plugin):

- ``default``: no setting (the plugin's own choice of path and config); ``sorted``: ``MOE_PORTABLE_DECODE=0``; ``decode``: ``MOE_PORTABLE_DECODE=1``;
  ``decode-prequant`` / ``decode-inkernel`` (fp8 activations): that with ``MOE_PORTABLE_PREQUANT=1`` / ``0``;
  ``decode-mma``: on the Gluon tensor-core kernels (``MOE_PORTABLE_DECODE_MMA=1``,
  fp8 activations pre-quantized) with the table's or the heuristic's tiles where they fit them
  (else the Triton kernels: the row's ``config`` says which);
  ``decode-chain``: both decode GEMMs in one launch (``MOE_PORTABLE_DECODE_CHAIN=1``) on the
  table's or the heuristic's tiles;
- ``sorted-dot_scaled`` / ``sorted-dequant`` (mxfp4): ``MOE_PORTABLE_MXFP4`` forced;
  ``sorted-no_ptx``: dequantized by the portable Triton code (``MOE_PORTABLE_MX_PTX=0``);

the device time of one ``moe_apply`` (CUDA graph of ``--copies`` calls, each on its own weights,
drawn with its own seed as ``moe bench`` does, so that the experts a call reads are not in L2
from the call before; ``prepare`` may keep the caller's tensors, so copies of one draw would not do;
median replay / copies), its relative error against the float64 reference, and the config
the lookup gave (tuned table entry or heuristic: ``table``). Tables: ``MOE_PORTABLE_CONFIG_DIR``
or the package's. Writes ``quant_paths.json`` and ``quant_paths.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch

VARIANTS = {
    "default": {},  # the planner's own choice (tuned entry or heuristics)
    "sorted": {"MOE_PORTABLE_DECODE": "0"},
    "decode": {"MOE_PORTABLE_DECODE": "1"},
    "decode-prequant": {"MOE_PORTABLE_DECODE": "1", "MOE_PORTABLE_PREQUANT": "1"},
    "decode-inkernel": {"MOE_PORTABLE_DECODE": "1", "MOE_PORTABLE_PREQUANT": "0"},
    "decode-mma": {"MOE_PORTABLE_DECODE": "1", "MOE_PORTABLE_DECODE_MMA": "1"},
    "decode-chain": {"MOE_PORTABLE_DECODE": "1", "MOE_PORTABLE_DECODE_CHAIN": "1"},
    "sorted-dot_scaled": {"MOE_PORTABLE_DECODE": "0", "MOE_PORTABLE_MXFP4": "dot_scaled"},
    "sorted-dequant": {"MOE_PORTABLE_DECODE": "0", "MOE_PORTABLE_MXFP4": "dequant"},
    "sorted-no_ptx": {
        "MOE_PORTABLE_DECODE": "0",
        "MOE_PORTABLE_MXFP4": "dequant",
        "MOE_PORTABLE_MX_PTX": "0",
    },
}
#: "cuda"; "cpu" when there is no GPU (a smoke run of this script under TRITON_INTERPRET=1)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
KNOBS = (
    "MOE_PORTABLE_DECODE",
    "MOE_PORTABLE_MXFP4",
    "MOE_PORTABLE_MX_PTX",
    "MOE_PORTABLE_PREQUANT",
    "MOE_PORTABLE_DECODE_MMA",
    "MOE_PORTABLE_DECODE_CHAIN",
)


def applies(variant: str, quant: str) -> bool:
    if variant == "decode-mma":  # the tensor-core decode kernels: every scheme
        return True
    if variant.startswith("decode-"):  # the activations' quantization: fp8 activations only
        return quant not in ("mxfp4", "bf16")
    return quant.startswith("mxfp4") or not variant.startswith("sorted-")


def set_variant(name: str) -> None:
    from moe_plugin_portable import experts

    for k in KNOBS:
        os.environ.pop(k, None)
    os.environ.update(VARIANTS[name])
    for cached in (experts._configs, experts._decode_kwargs):
        cached.cache_clear()


def graph_us(calls, reps: int = 20) -> float:
    if DEV != "cuda":  # a smoke run (TRITON_INTERPRET=1): one pass, timings meaningless
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for c in calls:  # compile and warm outside the graph
            c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return sorted(times)[len(times) // 2]


def layers(models: str, quants: str, copies: int) -> Iterator[tuple]:
    """Per layer (``models`` x ``quants``, comma-separated): ``(model, quant, preset, spec, plan,
    drawn, prepared)``, ``drawn``: ``copies`` weight sets, each drawn with its own seed (as ``moe
    bench`` does), ``prepared``: their ``plan.prepare``. Both lists are emptied (and the GPU's
    cache freed) when the next layer is asked for: drop whatever else holds their tensors first."""
    from moe_core import moe_plan
    from moe_core.presets import get_preset
    from moe_core.testing import random_expert_weights
    from moe_plugin_portable.experts import QUANT_VARIANTS

    for model in models.split(","):
        preset = get_preset(model)
        for quant in quants.split(","):
            spec = preset.moe_spec(torch.bfloat16, quant=QUANT_VARIANTS.get(quant, quant))
            plan = moe_plan(spec, DEV, backend="portable.triton.fused_moe")
            drawn = [random_expert_weights(spec, device=DEV, seed=i) for i in range(copies)]
            prepared = [plan.prepare(w) for w in drawn]
            yield model, quant, preset, spec, plan, drawn, prepared
            drawn.clear()
            prepared.clear()
            if DEV == "cuda":
                torch.cuda.empty_cache()


def case(preset, spec, T: int, weights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, topk_weights, topk_ids, reference out)`` of a layer at ``T`` tokens: seeded by ``T``,
    the preset's routing with uniform load, the float64 reference on ``weights``."""
    from moe_core.bench.suite import uniform_routing
    from moe_core.reference import fused_experts_reference

    gen = torch.Generator(device=DEV).manual_seed(T)
    x = torch.randn(T, spec.hidden_size, generator=gen, device=DEV).to(spec.dtype)
    topk_w, topk_ids = uniform_routing(preset.routing, T, preset.num_experts, device=DEV, seed=T)
    want = fused_experts_reference(spec, x, weights, topk_w, topk_ids, compute_dtype=torch.float64)
    return x, topk_w, topk_ids, want


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="deepseek-v3-tp8,gpt-oss-120b")
    parser.add_argument("--quant", default="fp8,mxfp4")
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument(
        "--from-json", help="rewrite quant_paths.md from this quant_paths.json; measure nothing"
    )
    args = parser.parse_args()
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        write(Path(args.out), data["meta"], data["rows"])
        return

    from moe_core import moe_apply
    from moe_core.bench.floors import measure_ceilings
    from moe_core.testing import relative_error, tolerance
    from moe_plugin_portable import configs

    rows = []
    start = time.monotonic()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    ceilings = measure_ceilings(DEV) if DEV == "cuda" else None
    meta = {
        "device": name,
        "torch": torch.__version__,
        "copies": args.copies,
        "wall_s": 0,
        "ceilings": ceilings,
    }
    for model, quant, preset, spec, plan, drawn, prepared in layers(args.models, args.quant, args.copies):
        for T in (int(t) for t in args.tokens.split(",")):
            x, topk_w, topk_ids, want = case(preset, spec, T, drawn[0])
            entry = configs._table_entry(spec, T, name)
            for variant in args.variants.split(","):
                if not applies(variant, quant):
                    continue
                set_variant(variant)
                row = {
                    "model": model,
                    "quant": quant,
                    "T": T,
                    "variant": variant,
                    "table": entry is not None,
                }
                try:
                    outs = [torch.full_like(x, float("nan")) for _ in prepared]
                    calls = [
                        functools.partial(moe_apply, plan, x, p, topk_w, topk_ids, out=o)
                        for p, o in zip(prepared, outs)
                    ]
                    row["us"] = round(graph_us(calls), 1)
                    row["rel_err"] = float(relative_error(outs[0], want))
                    row["ok"] = row["rel_err"] <= tolerance(spec)
                    decode = configs.lookup_decode(spec, T, x.device, capturing=True)
                    row["config"] = (
                        str(decode) if decode is not None else str(configs.lookup_config(spec, T, x.device))
                    )
                except Exception as exc:  # recorded, never fatal
                    row["error"] = f"{type(exc).__name__}: {exc}"[:300]
                rows.append(row)
                print(json.dumps(row), flush=True)
        calls = outs = None  # they hold the prepared copies, which layers() frees next
        meta["wall_s"] = round(time.monotonic() - start)
        write(Path(args.out), meta, rows)  # after every layer: a time limit keeps what was measured
    for k in KNOBS:
        os.environ.pop(k, None)


def floors(rows: list[dict], ceilings: dict[str, float]) -> dict[tuple[str, str, int], float]:
    """The physical floor (us) of each (model, quant, T) of ``rows`` (``moe_core.bench.floors``)."""
    from moe_core.bench.floors import preset_floor_us
    from moe_core.presets import get_preset
    from moe_plugin_portable.experts import QUANT_VARIANTS

    found = {}
    for model, quant, T in {(r["model"], r["quant"], r["T"]) for r in rows}:
        preset = get_preset(model)
        spec = preset.moe_spec(torch.bfloat16, quant=QUANT_VARIANTS.get(quant, quant))
        found[model, quant, T] = preset_floor_us(preset, spec, T, ceilings)
    return found


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    """``quant_paths.json`` and ``quant_paths.md`` under ``out``: every row, then the fastest correct
    variant per case with its ratio to the floor (the run's ceilings: measured, or
    ``H100_CEILINGS`` for an H100 run that recorded none) and this plugin's best bf16 time over it."""
    from moe_core.bench.floors import H100_CEILINGS

    out.mkdir(parents=True, exist_ok=True)
    (out / "quant_paths.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    name = meta["device"]
    lines = [
        f"# quant_paths on {name}",
        "",
        json.dumps({k: v for k, v in meta.items() if k != "ceilings"}),
        "",
        "| model | quant | T | variant | us | rel. err | ok | table |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['quant']} | {r['T']} | {r['variant']} | {r.get('us', '-')} | "
            f"{r.get('rel_err', float('nan')):.1e} | {r.get('ok', r.get('error', ''))} | {r['table']} |"
        )
    ceilings = meta.get("ceilings") or (H100_CEILINGS if "H100" in name else None)
    best: dict[tuple[str, str, int], dict] = {}
    for r in rows:
        key = (r["model"], r["quant"], r["T"])
        if r.get("ok") and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    if best and ceilings:
        floor = floors(rows, ceilings)
        lines += [
            "",
            "Fastest correct variant per case; floor from the ceilings "
            f"{json.dumps({k: f'{v:.3g}' for k, v in ceilings.items()})}; "
            "`vs bf16`: the best bf16 time of the same model and T over this one.",
            "",
            "| model | quant | T | best | us | floor us | x floor | vs bf16 | default us |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, r in sorted(best.items()):
            model, quant, T = key
            bf16 = best.get((model, "bf16", T))
            default = next(
                (x for x in rows if (x["model"], x["quant"], x["T"]) == key and x["variant"] == "default"),
                None,
            )
            vs_bf16 = f"{bf16['us'] / r['us']:.2f}" if bf16 else "-"
            lines.append(
                f"| {model} | {quant} | {T} | {r['variant']} | {r['us']} | {floor[key]:.1f} | "
                f"{r['us'] / floor[key]:.2f} | {vs_bf16} | {default.get('us', '-') if default else '-'} |"
            )
    (out / "quant_paths.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
