"""On the GPU: where a decode step's time goes, against what two launches can reach at all.

    python tools/decode_stages.py [--models deepseek-v3-tp8,gpt-oss-120b,qwen3-30b-a3b]
        [--quant bf16,fp8,fp8_block,mxfp4] [--tokens 1,8] [--copies 8] [--out DIR]

Per layer (model x scheme) and ``T``, on the decode config the plugin picks for a captured
call (``configs.lookup_decode``, forced on with ``MOE_PORTABLE_DECODE=1`` where the rule would
take the sorted path), all L2-cold (CUDA graph of ``--copies`` calls, each on its own weights,
median replay / copies, as ``tools/quant_paths.py``):

- ``step``: the decode launches together (the plugin's time for the layer);
- per launch (``pre1``, ``gemm1``, ``pre2``, ``gemm2``): that launch alone;
- ``read13`` / ``read2``: a Triton kernel that only reads the bytes of the distinct experts the
  call routes to (w13 / w2 and their scales, the canonical tensors: the same byte count as the
  prepared ones), the fastest of a few grid shapes, and ``read2x``: both reads as two launches,
  what a two-GEMM step costs with no arithmetic, dependency or tail of its own;
- ``read1``: the same bytes in one launch (each routed expert's tensors copied into one
  contiguous slab first), what a step fused into a single launch could reach at most;
- ``fused``: ``tools/fused_decode.py``'s step (one weight-streaming launch, then a fixed-order
  sum of its partials), bf16/fp16 and mxfp4 W4A16 layers, the fastest shape within tolerance;
- ``empty2``: two empty launches (the graph's fixed cost per step);
- ``floor``: BENCHMARKS.md's floor (``preset_floor_us`` on the copy bandwidth measured here).

So ``step / read2x`` is how far the GEMMs are from the memory system's reach on two launches
and ``read2x / floor`` what the launch split and ramp-up cost before any kernel work.
Writes ``decode_stages.json`` and ``decode_stages.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quant_paths import DEV, case, graph_us, layers

#: (int32 words per program, words per load, warps); the read kernels' grid shapes searched
READ_SHAPES = (
    (4096, 1024, 4),
    (16384, 1024, 4),
    (65536, 2048, 4),
    (262144, 2048, 4),
    (16384, 2048, 8),
    (65536, 4096, 8),
)
STAGES = ("pre1", "gemm1", "pre2", "gemm2")


@triton.jit
def _read_words(w_ptr, ids_ptr, out_ptr, words, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """Program (slot, chunk): XOR of the ``CHUNK`` int32 words of expert ``ids[slot]``'s
    ``words``-word slab at ``chunk``, stored so the loads cannot be dropped."""
    slot, chunk = tl.program_id(0), tl.program_id(1)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    start = chunk * CHUNK
    base = w_ptr + e * words + start
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(0, CHUNK, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc ^= tl.load(base + offs, mask=start + offs < words, other=0)
    tl.store(out_ptr + (slot * tl.num_programs(1) + chunk) * BLOCK + tl.arange(0, BLOCK), acc)


def read_call(tensors: list[torch.Tensor], ids: torch.Tensor, shape: tuple[int, int, int]):
    """A call reading expert ``ids``' slabs of each ``[E, ...]`` tensor (one launch each)."""
    chunk, block, warps = shape
    launches = []
    for t in tensors:
        flat = t.contiguous().view(t.shape[0], -1)
        if flat.shape[1] * flat.element_size() % 4:
            flat = torch.nn.functional.pad(
                flat.view(torch.uint8), (0, 4 - flat.shape[1] * flat.element_size() % 4)
            )
        words = flat.view(torch.int32)
        n = words.shape[1]
        grid = (ids.numel(), triton.cdiv(n, chunk))
        out = torch.empty(grid[0] * grid[1] * block, dtype=torch.int32, device=t.device)
        launches.append((words, grid, out, n))

    def call():
        for words, grid, out, n in launches:
            _read_words[grid](words, ids, out, n, CHUNK=chunk, BLOCK=block, num_warps=warps)

    return call


@triton.jit
def _empty(x_ptr):
    pass


def slab(tensors: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Experts ``ids``' parts of every ``[E, ...]`` tensor, as one ``[len(ids), n]`` byte slab per expert."""
    rows = [t[ids.long()].reshape(ids.numel(), -1).contiguous().view(torch.uint8) for t in tensors]
    return torch.cat(rows, dim=1)


def weight_tensors(w) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(GEMM 1's, GEMM 2's) canonical tensors with a leading expert axis: weights, scales, biases."""
    first = [w.w13] + [t for t in (w.w13_scale, w.b13) if t is not None]
    second = [w.w2] + [t for t in (w.w2_scale, w.b2) if t is not None]
    return first, second


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="deepseek-v3-tp8,gpt-oss-120b,qwen3-30b-a3b")
    parser.add_argument("--quant", default="bf16,fp8,fp8_block,mxfp4")
    parser.add_argument("--tokens", default="1,8")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()

    from moe_core.bench.floors import measure_ceilings

    start = time.monotonic()
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    ceilings = measure_ceilings(DEV)
    meta = {"device": name, "torch": torch.__version__, "triton": triton.__version__, "copies": args.copies}
    meta["ceilings"] = ceilings
    rows: list[dict] = []
    dummy = torch.empty(1, device=DEV)
    empty2 = graph_us([functools.partial(_empty[(1,)], dummy) for _ in range(2 * args.copies)]) * 2
    for model, quant, preset, spec, _, drawn, prepared in layers(args.models, args.quant, args.copies):
        for T in (int(t) for t in args.tokens.split(",")):
            row: dict = {"model": model, "quant": quant, "T": T, "empty2": round(empty2, 1)}
            try:
                row.update(measure(preset, spec, T, drawn, prepared, ceilings))
            except Exception as exc:  # recorded, never fatal
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
        meta["wall_s"] = round(time.monotonic() - start)
        write(Path(args.out), meta, rows)  # after every layer: a time limit keeps what was measured


def measure(preset, spec, T: int, drawn: list, prepared: list, ceilings: dict) -> dict:
    """One case's row (module docstring) on its ``drawn`` weight sets and their ``prepared`` copies."""
    from moe_core.bench.floors import preset_floor_us
    from moe_core.testing import relative_error, tolerance
    from moe_plugin_portable import configs
    from moe_plugin_portable._launch import run_launch
    from moe_plugin_portable.experts import decode_launches

    x, topk_w, topk_ids, want = case(preset, spec, T, drawn[0])
    topk_w, topk_ids = topk_w.contiguous(), topk_ids.contiguous()
    row: dict = {}
    cfg = configs.lookup_decode(spec, T, x.device, capturing=True)
    row["rule"] = "decode" if cfg is not None else "sorted"
    if cfg is None:  # the decode path forced, its config from the table or heuristic
        os.environ["MOE_PORTABLE_DECODE"] = "1"
        try:
            cfg = configs.lookup_decode(spec, T, x.device, capturing=True)
        finally:
            os.environ.pop("MOE_PORTABLE_DECODE")
    row["config"] = str(cfg)
    outs = [torch.full_like(x, float("nan")) for _ in prepared]
    per_copy = [decode_launches(spec, x, p.tensors, topk_w, topk_ids, o, cfg) for p, o in zip(prepared, outs)]
    row["step"] = round(graph_us([functools.partial(_run_all, ls, run_launch) for ls in per_copy]), 1)
    row["rel_err"] = float(relative_error(outs[0], want))
    row["ok"] = row["rel_err"] <= tolerance(spec)
    for j, stage in enumerate(_stage_names(per_copy[0])):
        row[stage] = round(graph_us([functools.partial(run_launch, *ls[j]) for ls in per_copy]), 1)
    ids = torch.unique(topk_ids).to(torch.int32)
    best: dict[str, float] = {}
    slabs = [slab([*weight_tensors(w)[0], *weight_tensors(w)[1]], ids) for w in drawn]
    rows = torch.arange(ids.numel(), dtype=torch.int32, device=ids.device)
    for shape in READ_SHAPES:
        for key, pick in (("read13", 0), ("read2", 1), ("read2x", None)):
            calls = []
            for w in drawn:
                first, second = weight_tensors(w)
                calls.append(read_call(first + second if pick is None else (first, second)[pick], ids, shape))
            best[key] = min(best.get(key, float("inf")), graph_us(calls))
        best["read1"] = min(
            best.get("read1", float("inf")), graph_us([read_call([s], rows, shape) for s in slabs])
        )
    del slabs
    row.update({k: round(v, 1) for k, v in best.items()})
    row.update(_fused(spec, drawn, x, topk_w, topk_ids, want))
    row["floor"] = round(preset_floor_us(preset, spec, T, ceilings), 1)
    return row


def _fused(spec, drawn: list, x, topk_w, topk_ids, want) -> dict:
    """``fused`` (tools/fused_decode.py: the step in one weight-streaming launch and a fixed-order
    sum of its partials), the fastest of its shapes that is within the spec's tolerance, with
    that shape and its error; nothing where the probe does not take the layer."""
    from fused_decode import SHAPES, fused_call

    from moe_core.testing import relative_error, tolerance

    found: dict = {}
    for shape in SHAPES:
        try:
            outs = [torch.full_like(x, float("nan")) for _ in drawn]
            calls = [fused_call(spec, w, x, topk_w, topk_ids, o, shape) for w, o in zip(drawn, outs)]
            calls[0]()
            err = float(relative_error(outs[0], want))
            if err > tolerance(spec):
                found.setdefault("fused_rejected", []).append(f"{shape}: rel err {err:.1e}")
                continue
            us = graph_us(calls)
        except ValueError as exc:  # a layer or shape the probe does not take
            found.setdefault("fused_skipped", str(exc)[:120])
            continue
        if us < found.get("fused", float("inf")):
            found.update(fused=round(us, 1), fused_shape=list(shape), fused_rel_err=err)
    return found


def _stage_names(launches: list) -> list[str]:
    """Names of a decode step's launches, in order: GEMM 1 and 2, each after its pre-pass if any
    (a pre-pass: a launch of the quantization kernel)."""
    quantize = _quantize_kernel()
    names, gemm = [], 1
    for kernel, *_ in launches:
        if kernel is quantize:
            names.append(f"pre{gemm}")
        else:
            names.append(f"gemm{gemm}")
            gemm += 1
    return names


def _quantize_kernel():
    from moe_plugin_portable.experts import _kernels

    return _kernels().moe_quant_fp8


def _run_all(launches: list, run_launch) -> None:
    for launch in launches:
        run_launch(*launch)


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_stages.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    cols = ("step", *STAGES, "read13", "read2", "read2x", "read1", "fused", "empty2", "floor")
    lines = [
        f"# decode step by launch, {meta['device']} (torch {meta['torch']}, triton {meta['triton']})",
        "",
        "us, L2-cold CUDA graphs; read*: read-only kernels over the same expert bytes (module docstring)",
        "",
        "| model | quant | T | rule | "
        + " | ".join(cols)
        + " | step/read2x | read2x/floor | read1/floor | ok |",
        "|---|---|---|---|" + "---|" * (len(cols) + 4),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['quant']} | {r['T']} | error: {r['error']} |")
            continue
        cells = [str(r.get(c, "")) for c in cols]
        ratio = f"{r['step'] / r['read2x']:.2f}" if r.get("read2x") else ""
        reach = f"{r['read2x'] / r['floor']:.2f}" if r.get("floor") else ""
        one = f"{r['read1'] / r['floor']:.2f}" if r.get("floor") and r.get("read1") else ""
        lines.append(
            f"| {r['model']} | {r['quant']} | {r['T']} | {r['rule']} | "
            + " | ".join(cells)
            + f" | {ratio} | {reach} | {one} | {r['ok']} |"
        )
    (out / "decode_stages.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
