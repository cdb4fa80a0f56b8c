"""On the GPU: the decode path and the fast launch of portable.triton.fused_moe, old against new.

    python tools/profile_apply.py [--models a,b] [--tokens 1,2,4,8] [--out DIR] [--no-sweep]
        [--profile MODEL:T]

Per model (bf16) and token count ``T``, for the sorted path (``MOE_PORTABLE_DECODE=0``, the
old 4-launch path) and the decode path (``MOE_PORTABLE_DECODE=1``, 2 launches):

- ``err``: relative error against the float64 reference (poisoned output, fresh random
  routing of the preset, ``torch.cuda.set_sync_debug_mode("error")`` around the call, and
  ``MOE_PORTABLE_FAST_LAUNCH=check``: every cached launch is checked against the kernel
  Triton itself picks); ``ok`` when within ``moe_core.testing.tolerance``;
- ``dev us``: device time of one ``moe_apply`` in a CUDA graph
  (``triton.testing.do_bench_cudagraph``, median), and ``x floor``: that over the bytes of
  the experts the routing touches (each once) plus activations, at the copy bandwidth
  measured in the same run;
- ``host us``: host time per eager ``moe_apply`` (200 calls, no sync in between; the GPU
  is idle enough that the host is the bound at these T) with the normal Triton launch
  (``MOE_PORTABLE_FAST_LAUNCH=0``) and the cached fast launch (default).

``rule`` is what ``configs.use_decode`` picks for that ``T`` (``D`` decode, ``S`` sorted). With
the sweep (default on) each model at T=1 also times a few decode tile configs against the
heuristic's (input for the next tuned table). ``--profile MODEL:T`` adds a cProfile of the
fast path. Every case runs in its own ``try``; errors are printed and recorded, never fatal.
Writes ``profile_apply.json`` and ``profile_apply.md`` under ``--out`` (default ``$OUT`` or ``.``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import sys
import time
import traceback

import torch

MODELS = "qwen3-30b-a3b,qwen3-235b-a22b-tp8,deepseek-v3-tp8,gpt-oss-20b,mixtral-8x7b"
PATHS = {"sorted": "0", "decode": "1"}
#: "cuda"; "cpu" (``--device cpu`` with TRITON_INTERPRET=1: a smoke run of this script, timings meaningless)
DEV = "cuda"
#: time.monotonic() after which remaining cases are skipped (``--budget-s``), so the files are written
DEADLINE = float("inf")


def out_of_time() -> bool:
    return time.monotonic() > DEADLINE


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def env(**values: str | None):
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def bench_graph_us(fn) -> float:
    import triton.testing

    fn()
    sync()
    if DEV != "cuda":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median") * 1e3


def copy_bandwidth() -> float:
    if DEV != "cuda":
        return 4.0e12
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV).random_()
    dst = torch.empty_like(src)
    us = bench_graph_us(lambda: dst.copy_(src))
    return 2 * (1 << 30) / (us * 1e-6)


def host_us(fn, n: int = 200) -> float:
    if DEV != "cuda":
        n = 2
    for _ in range(20 if DEV == "cuda" else 1):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n * 1e6
    sync()
    return host


def floor_bytes(spec, prepared, ids: torch.Tensor, T: int) -> int:
    """Weights of the distinct local experts the routing touches, once each, plus x and out."""
    emap = prepared.tensors.get("expert_map")
    local = ids.reshape(-1).long()
    if emap is not None:
        local = emap.long()[local]
    experts = torch.unique(local[local >= 0]).numel()
    per_expert = sum(
        t[0].numel() * t.element_size()
        for name, t in prepared.tensors.items()
        if name in ("w13", "w2", "b13", "b2", "w13_scale", "w2_scale")
    )
    return experts * per_expert + 2 * T * spec.hidden_size * spec.dtype.itemsize


def run_model(model: str, tokens: list[int], bw: float, sweep: bool, rows: list, errors: list) -> None:
    import moe_core
    from moe_core.presets import get_preset
    from moe_core.reference import fused_experts_reference
    from moe_core.testing import random_expert_weights, random_routing, relative_error, tolerance
    from moe_plugin_portable import _launch, configs

    preset = get_preset(model)
    spec = preset.moe_spec(torch.bfloat16)
    plan = moe_core.moe_plan(spec, DEV)
    weights = random_expert_weights(spec, device=DEV, seed=0)
    prepared = plan.prepare(weights)
    print(f"\n{model}: {spec.describe()} -> {plan.kernel}", flush=True)
    for T in tokens:
        if out_of_time():
            rows.append(
                {"model": model, "T": T, "path": "sorted", "rule": "-", "error": "skipped: --budget-s"}
            )
            continue
        x = torch.randn(T, spec.hidden_size, device=DEV).to(spec.dtype)
        w, ids = random_routing(preset.routing, T, preset.num_experts, device=DEV, seed=T)
        rule = "D" if configs.use_decode(T, spec.top_k, spec.num_experts) else "S"
        want = fused_experts_reference(spec, x, weights, w, ids, compute_dtype=torch.float64)
        floor_us = floor_bytes(spec, prepared, ids, T) / bw * 1e6
        for path, flag in PATHS.items():
            row = {"model": model, "T": T, "path": path, "rule": rule, "floor_us": round(floor_us, 2)}
            try:
                with env(MOE_PORTABLE_DECODE=flag, MOE_PORTABLE_FAST_LAUNCH="check"):
                    out = torch.full_like(x, float("nan"))
                    moe_core.moe_apply(plan, x, prepared, w, ids, out=out)  # compiles, caches
                    sync()
                    out.fill_(float("nan"))
                    if DEV == "cuda":
                        torch.cuda.set_sync_debug_mode("error")
                    try:
                        moe_core.moe_apply(plan, x, prepared, w, ids, out=out)
                        moe_core.moe_apply(plan, x, prepared, w, ids, out=out)  # a checked cache hit
                    finally:
                        if DEV == "cuda":
                            torch.cuda.set_sync_debug_mode("default")
                    err = relative_error(out, want)
                    row["err"] = float(err)
                    row["ok"] = bool(err <= tolerance(spec))
                with env(MOE_PORTABLE_DECODE=flag):
                    out = torch.empty_like(x)
                    call = lambda x=x, w=w, ids=ids, out=out: moe_core.moe_apply(
                        plan, x, prepared, w, ids, out=out
                    )
                    dev = bench_graph_us(call)
                    row["device_us"] = round(dev, 2)
                    row["x_floor"] = round(dev / floor_us, 3)
                    for fast in ("0", "1"):
                        with env(MOE_PORTABLE_FAST_LAUNCH=fast):
                            before = _launch.fast_launch_stats()["fast"]
                            row[f"host_us_fast{fast}"] = round(host_us(call), 1)
                            row[f"fast_launches_fast{fast}"] = _launch.fast_launch_stats()["fast"] - before
                    # the fast launch's result equals the normal launch's, bit for bit
                    a = torch.empty_like(x)
                    moe_core.moe_apply(plan, x, prepared, w, ids, out=a)
                    with env(MOE_PORTABLE_FAST_LAUNCH="0"):
                        b = moe_core.moe_apply(plan, x, prepared, w, ids)
                    row["fast_equals_normal"] = bool(torch.equal(a, b))
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"
                errors.append(f"{model} T={T} {path}:\n{traceback.format_exc()}")
                print(f"  ERROR {model} T={T} {path}: {exc}", flush=True)
            rows.append(row)
            print("  " + format_row(row), flush=True)
    if sweep and not out_of_time():
        try:
            rows.extend(decode_sweep(model, spec, prepared, preset))
        except Exception as exc:
            errors.append(f"{model} sweep:\n{traceback.format_exc()}")
            print(f"  ERROR sweep {model}: {exc}", flush=True)


def decode_sweep(model, spec, prepared, preset) -> list[dict]:
    """Graph time of the decode path at T=1 for a few tile configs (heuristic's first)."""
    from moe_core.testing import random_routing
    from moe_plugin_portable import configs, experts

    T = 1
    x = torch.randn(T, spec.hidden_size, device=DEV).to(spec.dtype)
    w, ids = random_routing(preset.routing, T, preset.num_experts, device=DEV, seed=1)
    out = torch.empty_like(x)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if DEV == "cuda" else 8
    base = configs.decode_heuristic(spec, T, sms, False)
    G = configs.GemmConfig
    cands = [("heuristic", base)]
    for bn1, bk1, bn2, bk2, warps, stages in (
        (base.gemm1.block_n * 2, base.gemm1.block_k, base.gemm2.block_n, base.gemm2.block_k, 4, 3),
        (max(4, base.gemm1.block_n // 2), base.gemm1.block_k, base.gemm2.block_n, base.gemm2.block_k, 4, 3),
        (base.gemm1.block_n, 128, base.gemm2.block_n, 128, 4, 3),
        (base.gemm1.block_n, 256, base.gemm2.block_n, 256, 4, 3),
        (base.gemm1.block_n * 2, 256, base.gemm2.block_n * 2, 256, 4, 3),
        (base.gemm1.block_n, base.gemm1.block_k, base.gemm2.block_n * 2, base.gemm2.block_k, 4, 3),
        (base.gemm1.block_n, base.gemm1.block_k, max(4, base.gemm2.block_n // 2), base.gemm2.block_k, 4, 3),
        (base.gemm1.block_n, base.gemm1.block_k, base.gemm2.block_n, base.gemm2.block_k, 8, 3),
        (base.gemm1.block_n, base.gemm1.block_k, base.gemm2.block_n, base.gemm2.block_k, 2, 3),
        (base.gemm1.block_n, base.gemm1.block_k, base.gemm2.block_n, base.gemm2.block_k, 4, 1),
        (base.gemm1.block_n, base.gemm1.block_k, base.gemm2.block_n, base.gemm2.block_k, 4, 4),
    ):
        cands.append(
            (
                f"g1 {bn1}x{bk1} g2 {bn2}x{bk2} w{warps} s{stages}",
                configs.DecodeConfig(G(bn1, bk1, warps, stages, 1), G(bn2, bk2, warps, stages, 1)),
            )
        )
    rows = []
    ref = None
    for name, cfg in cands:
        if out_of_time():
            break
        row = {"model": model, "T": T, "path": "sweep", "config": name, "decode_config": cfg.to_json()}
        try:
            call = lambda cfg=cfg: experts.fused_moe(spec, x, prepared.tensors, w, ids, out, config=cfg)
            call()
            if ref is None:
                ref = out.clone()
            row["same_as_heuristic_rel"] = float((out.float() - ref.float()).norm() / ref.float().norm())
            row["device_us"] = round(bench_graph_us(call), 2)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  sweep {model} {name:40s} {row.get('device_us', row.get('error'))}", flush=True)
        rows.append(row)
    return rows


HEAD = (
    f"{'model':22s} {'T':>3s} {'rule':>4s} {'path':7s} {'err':>9s} {'ok':>3s} {'dev us':>8s} "
    f"{'floor':>7s} {'x floor':>7s} {'host0 us':>9s} {'host1 us':>9s}"
)


def format_row(r: dict) -> str:
    if "error" in r:
        return f"{r['model']:22s} {r['T']:3d} {r['rule']:>4s} {r['path']:7s} ERROR {r['error'][:120]}"

    def f(key, fmt):
        return format(r[key], fmt) if key in r else "-"

    return (
        f"{r['model']:22s} {r['T']:3d} {r['rule']:>4s} {r['path']:7s} {f('err', '9.2e')} "
        f"{('yes' if r.get('ok') else 'NO'):>3s} {f('device_us', '8.1f')} {f('floor_us', '7.1f')} "
        f"{f('x_floor', '7.2f')} {f('host_us_fast0', '9.1f')} {f('host_us_fast1', '9.1f')}"
    )


def profile_case(spec_arg: str) -> str:
    import moe_core
    from moe_core.presets import get_preset
    from moe_core.testing import random_expert_weights, random_routing

    model, T = spec_arg.split(":")
    T = int(T)
    preset = get_preset(model)
    spec = preset.moe_spec(torch.bfloat16)
    plan = moe_core.moe_plan(spec, DEV)
    prepared = plan.prepare(random_expert_weights(spec, device=DEV))
    x = torch.randn(T, spec.hidden_size, device=DEV, dtype=torch.bfloat16)
    w, ids = random_routing(preset.routing, T, preset.num_experts, device=DEV)
    out = torch.empty_like(x)
    host_us(lambda: moe_core.moe_apply(plan, x, prepared, w, ids, out=out))
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300 if DEV == "cuda" else 3):
        moe_core.moe_apply(plan, x, prepared, w, ids, out=out)
    prof.disable()
    sync()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    return (
        f"cProfile of 300 moe_apply calls, {model} T={T} (default paths, fast launch on)\n" + text.getvalue()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--tokens", default="1,2,4,8")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--profile", default="qwen3-30b-a3b:1", help="MODEL:T for a cProfile ('' for none)")
    parser.add_argument("--budget-s", type=float, default=400, help="skip what is left after this long")
    parser.add_argument("--device", default="cuda", help="cuda; cpu: a smoke run under TRITON_INTERPRET=1")
    args = parser.parse_args()
    global DEV, DEADLINE
    DEV = args.device
    DEADLINE = time.monotonic() + args.budget_s
    import triton

    os.makedirs(args.out, exist_ok=True)
    info = {
        "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (interpreter smoke run)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": os.environ.get("MOE_BENCH_COMMIT", ""),
    }
    print(json.dumps(info), flush=True)
    rows: list[dict] = []
    errors: list[str] = []
    try:
        bw = copy_bandwidth()
    except Exception:
        errors.append(traceback.format_exc())
        bw = 4.0e12
    info["copy_bandwidth_TBps"] = round(bw / 1e12, 3)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s\n{HEAD}", flush=True)
    tokens = [int(t) for t in args.tokens.split(",") if t]
    for model in [m for m in args.models.split(",") if m]:
        try:
            run_model(model, tokens, bw, not args.no_sweep, rows, errors)
            if DEV == "cuda":
                torch.cuda.empty_cache()
        except Exception as exc:
            errors.append(f"{model}:\n{traceback.format_exc()}")
            print(f"ERROR {model}: {exc}", flush=True)
    profile_text = ""
    if args.profile:
        try:
            profile_text = profile_case(args.profile)
        except Exception:
            profile_text = traceback.format_exc()
    table = [HEAD] + [format_row(r) for r in rows if r["path"] != "sweep"]
    summary = summarize(rows)
    md = (
        f"# decode path and fast launch, {info['device']} (torch {info['torch']}, triton {info['triton']})\n\n"
        f"copy bandwidth {info['copy_bandwidth_TBps']} TB/s; host0 = normal Triton launch, "
        "host1 = cached fast launch; rule: configs.use_decode (D/S)\n\n```\n"
        + "\n".join(table)
        + "\n```\n\n"
        + summary
        + ("\n\n## errors\n\n```\n" + "\n".join(errors) + "\n```\n" if errors else "")
        + ("\n\n## profile\n\n```\n" + profile_text + "\n```\n" if profile_text else "")
    )
    with open(os.path.join(args.out, "profile_apply.json"), "w") as f:
        json.dump({"info": info, "rows": rows, "errors": errors}, f, indent=1)
    with open(os.path.join(args.out, "profile_apply.md"), "w") as f:
        f.write(md)
    print("\n" + summary)
    print(f"\n{len(errors)} errors; wrote {args.out}/profile_apply.json and .md")
    return 1 if errors or any(r.get("ok") is False for r in rows) else 0


def summarize(rows: list[dict]) -> str:
    """Per (model, T): decode vs sorted device time, and host time normal vs fast (default path)."""
    lines = ["| model | T | rule | sorted us | decode us | decode/sorted | host normal us | host fast us |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    by = {}
    for r in rows:
        if r["path"] in PATHS and "device_us" in r:
            by.setdefault((r["model"], r["T"]), {})[r["path"]] = r
    for (model, T), paths in by.items():
        s, d = paths.get("sorted"), paths.get("decode")
        chosen = d if (d and d["rule"] == "D") else s
        ratio = f"{d['device_us'] / s['device_us']:.2f}" if s and d else "-"
        lines.append(
            f"| {model} | {T} | {(s or d)['rule']} | {s['device_us'] if s else '-'} | "
            f"{d['device_us'] if d else '-'} | {ratio} | {chosen.get('host_us_fast0', '-') if chosen else '-'} | "
            f"{chosen.get('host_us_fast1', '-') if chosen else '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
