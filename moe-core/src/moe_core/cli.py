"""The ``moe`` command (also ``python -m moe_core``).

::

    moe plugins [--all]              discovered plugins: JSON (name, version, hooks, kernels, status, error)
    moe plan --model M [...]         the kernel chosen for a model's layer, and every refusal
    moe run  [--model M --tokens N]  plan, prepare and run a layer; check against the reference; time it
    moe tune --model M               tune plugins' kernels for a model on this GPU, write their tables,
                                     then time every kernel per T bucket (dispatch table, moe_core.dispatch)
    moe bench [--quick] [--out DIR]  every kernel and peer per case: floor, reference check, time; report
    moe doctor                       versions, devices, capabilities, plugins, environment
    moe presets                      the model presets
    moe <plugin> ...                 commands added by plugins (hook ``register_commands``)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
from importlib import metadata
from typing import Any

import torch

from .device import device_info
from .errors import MoEError, MoEInputError, PluginError
from .plugins import _strict as strict_plugins
from .plugins import plugin_manager
from .presets import all_presets, get_preset

__all__ = ["main"]

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_CPU_DEFAULT_MODEL = "tiny-qwen3-moe"
_GPU_DEFAULT_MODEL = "qwen3-30b-a3b"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def _cmd_plugins(args: argparse.Namespace) -> int:
    manager = plugin_manager()
    rows = []
    for record in manager.records.values():
        row = record.to_json()
        if args.all:
            row["kernels"] = [_kernel_json(manager.registry.get(name)) for name in record.kernels]
        rows.append(row)
    _print_json(rows)
    return 0


def _kernel_json(entry: Any) -> dict[str, Any]:
    return {
        "name": entry.name,
        "family": entry.family,
        "op": entry.op,
        "capability": entry.capability,
        "priority": entry.priority,
        "quant": sorted(entry.quant),
        "activations": sorted(entry.activations),
        "features": sorted(entry.features),
        "description": entry.description,
    }


def _spec_from_args(args: argparse.Namespace):
    preset = get_preset(args.model)
    return preset, preset.moe_spec(
        _DTYPES[args.dtype], args.quant, ep_size=args.ep_size, ep_rank=args.ep_rank
    )


def _cmd_plan(args: argparse.Namespace) -> int:
    from .planner import moe_plan

    _, spec = _spec_from_args(args)
    plan = moe_plan(spec, args.device, backend=args.backend)
    print(plan.explain())
    return 0


def _default_model() -> str:
    return _GPU_DEFAULT_MODEL if torch.cuda.is_available() else _CPU_DEFAULT_MODEL


def _cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_layer

    model = args.model or _default_model()
    result, explanation = run_layer(
        get_preset(model),
        tokens=args.tokens,
        dtype=_DTYPES[args.dtype],
        quant=args.quant,
        device=args.device,
        backend=args.backend,
        seed=args.seed,
        iters=args.iters,
        ep_size=args.ep_size,
        ep_rank=args.ep_rank,
    )
    if args.json:
        _print_json(result.to_json())
    else:
        if args.explain:
            print(explanation)
        verdict = "PASS" if result.passed else "FAIL"
        print(f"model    {result.model}: {result.spec}")
        print(f"device   {result.device}")
        print(f"kernel   {result.kernel}")
        print(f"tokens   {result.tokens}")
        print(
            f"check    {verdict}: relative error {result.relative_error:.3e} vs float64 reference "
            f"(bound {result.tolerance:.1e}), max abs error {result.max_abs_error:.3e}"
        )
        print(
            f"time     median {result.median_us:.1f} us, min {result.min_us:.1f} us over {result.iterations} runs"
        )
    return 0 if result.passed else 1


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _devices() -> list[dict[str, Any]]:
    found = [{"device": "cpu", "info": str(device_info("cpu"))}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            info = device_info(torch.device("cuda", i))
            mem = torch.cuda.get_device_properties(i).total_memory
            found.append(
                {
                    "device": f"cuda:{i}",
                    "name": info.name,
                    "vendor": info.vendor,
                    "arch": info.arch,
                    "capability": info.capability,
                    "memory_gib": round(mem / 2**30, 1),
                }
            )
    return found


def _cmd_doctor(args: argparse.Namespace) -> int:
    manager = plugin_manager()
    report = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            name: _version(name)
            for name in (
                "moe-core",
                "moe-plugin-portable",
                "moe-plugin-nvidia",
                "moe-plugin-amd",
                "torch",
                "triton",
                "pluggy",
                "flashinfer-python",
                "amd-aiter",
                "flydsl",
            )
        },
        "torch_cuda": torch.version.cuda,
        "torch_hip": getattr(torch.version, "hip", None),
        "devices": _devices(),
        "plugins": {
            r.name: r.status + (f": {r.error.strip().splitlines()[-1]}" if r.error else "")
            for r in manager.records.values()
        },
        "kernels": len(manager.registry.entries()),
        "plugin_reports": manager.environment_reports(),
        "environment": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(("MOE_", "TRITON_", "FLASHINFER_", "CUDA_VISIBLE"))
        },
    }
    _print_json(report)
    return 0


def _progress(label: str = "tuning"):
    """A ``progress(description, completed, total)`` callback: a rich bar when rich is installed."""
    try:
        from rich.progress import Progress
    except ImportError:

        def plain(description: str, completed: int, total: int) -> None:
            print(f"[{completed}/{total}] {description}", file=sys.stderr, flush=True)

        return plain, None
    from rich.console import Console

    bar = Progress(console=Console(stderr=True), transient=False)  # stdout stays the command's output
    task = bar.add_task(label, total=1)

    def update(description: str, completed: int, total: int) -> None:
        bar.update(task, description=description, completed=completed, total=total)

    return update, bar


def _cmd_tune(args: argparse.Namespace) -> int:
    _, spec = _spec_from_args(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else None
    progress, bar = _progress()
    kwargs = {"spec": spec, "device": device, "tokens": tokens, "output_dir": args.out, "progress": progress}
    with bar if bar is not None else contextlib.nullcontext():
        written = plugin_manager().tune(args.plugin, **kwargs)
        table = None
        if not args.no_dispatch:  # the core's own step, after the plugins tuned their configs
            from .dispatch import tune_dispatch

            table = tune_dispatch(
                spec, device, tokens=tokens, kernels=_names(args.kernels), progress=progress
            )
    result = {name: paths for name, paths in written.items()}
    if table is not None:
        result["dispatch"] = [table.path]
    _print_json(result)
    if table is not None:
        print("dispatch table (bucket -> kernel):", *table.describe(), sep="\n", file=sys.stderr)
    if not any(result.values()):
        print(
            f"moe tune: no plugin had anything to tune for {spec.describe()} on {device}"
            + ("" if args.no_dispatch else ", and fewer than two kernels support it (no dispatch table)"),
            file=sys.stderr,
        )
        return 1
    return 0


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def _cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import report as bench_report
    from .bench.suite import QUICK_TOKENS, TOKENS, BenchConfig, default_models, quick_models, run_bench
    from .spec import QUANT_SCHEMES, QuantScheme

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    models = _names(args.models) or default_models(device)
    if args.quick:
        models = quick_models(models)
    tokens = (
        [int(t) for t in _names(args.tokens)] if args.tokens else (QUICK_TOKENS if args.quick else TOKENS)
    )
    dtypes = []
    for name in _names(args.dtypes) or ["bf16"]:
        if name not in _DTYPES:
            raise MoEInputError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}")
        dtypes.append(_DTYPES[name])
    quants: list[str | None] = []
    for name in _names(args.quant) or ["none"]:
        if name != "none" and name.split("/")[0] not in QUANT_SCHEMES:
            raise MoEInputError(f"unknown quant scheme {name!r}; expected none or one of {QUANT_SCHEMES}")
        if "/" in name:
            QuantScheme.parse(name)  # a bad field fails here, before anything runs
        value = None if name in ("none", *_DTYPES) else name  # unquantized: weights in the activation dtype
        if value not in quants:
            quants.append(value)
    config = BenchConfig(
        models=models,
        tokens=tokens,
        dtypes=dtypes,
        quants=quants,
        kernels=_names(args.kernels),
        iters=args.iters or (30 if device.type == "cuda" else 10),
        device=device,
        vllm_peer=args.vllm_peer,
        quick=args.quick,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "bench.json"
    progress, bar = _progress("bench")

    def save(report: dict, case: dict) -> None:  # after every case: a crash keeps what ran
        bench_report.write_json(report, json_path)

    if bar is not None:
        with bar:
            report = run_bench(config, progress=progress, on_case=save)
    else:
        report = run_bench(config, progress=progress, on_case=save)
    bench_report.write_json(report, json_path)
    (out / "bench.md").write_text(bench_report.markdown(report))
    bench_report.print_table(report)
    plots, why = bench_report.plot(report, out)
    if why:
        print(f"moe bench: {why}", file=sys.stderr)
    print(f"wrote {json_path}, {out / 'bench.md'}" + "".join(f", {p}" for p in plots))
    bad = bench_report.failures(report)
    for line in bad:
        print(f"moe bench: FAIL {line}", file=sys.stderr)
    return 1 if bad else 0


def _cmd_presets(args: argparse.Namespace) -> int:
    rows = []
    for p in all_presets().values():
        rows.append(
            {
                "name": p.name,
                "H": p.hidden_size,
                "I": p.intermediate_size,
                "E": p.num_experts,
                "k": p.top_k,
                "routing": p.routing.method,
                "shared": p.routing.num_fused_shared_experts,
                "activation": p.activation,
                "bias": p.has_bias,
                "release_quant": p.release_quant,
            }
        )
    _print_json(rows)
    return 0


def _add_layer_args(p: argparse.ArgumentParser, model_required: bool) -> None:
    p.add_argument(
        "--model", required=model_required, default=None, help="preset name (moe presets lists them)"
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16", help="activation dtype")
    p.add_argument(
        "--quant", default=None, help="quant scheme (bf16, fp16, fp32, fp8, fp8_block, mxfp4, nvfp4)"
    )
    p.add_argument("--backend", default=None, help="force a kernel by name or dotted prefix (as MOE_BACKEND)")
    p.add_argument("--ep-size", type=int, default=1)
    p.add_argument("--ep-rank", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe", description="Mixture-of-Experts kernels: plugins, plans, runs."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plugins", help="discovered plugins and their kernels (JSON)")
    p.add_argument("--all", action="store_true", help="include each kernel's declaration")
    p.set_defaults(func=_cmd_plugins)

    p = sub.add_parser("plan", help="the kernel chosen for a model's MoE layer, and why")
    _add_layer_args(p, model_required=True)
    p.add_argument(
        "--device",
        "--device-override",
        dest="device",
        default=None,
        help="torch device (cuda:0) or an arch to plan for (sm_90, gfx950, hip:gfx950; as MOE_DEVICE_OVERRIDE)",
    )
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("run", help="run a model's MoE layer on random data, check it, time it")
    _add_layer_args(p, model_required=False)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--explain", action="store_true", help="print the plan's explanation too")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "tune", help="tune the plugins' kernels for a model here, then the per-T dispatch table"
    )
    _add_layer_args(p, model_required=True)
    p.add_argument("--device", default=None)
    p.add_argument("--tokens", default=None, help="comma list of token counts (default: one per bucket)")
    p.add_argument("--out", default=None, help="folder for the tables (default: where the plugins read them)")
    p.add_argument("--plugin", action="append", default=None, help="only this plugin (repeatable)")
    p.add_argument(
        "--no-dispatch", action="store_true", help="skip timing the kernels per T bucket (dispatch table)"
    )
    p.add_argument(
        "--kernels", default=None, help="dispatch among these kernels only (comma list, names or prefixes)"
    )
    p.set_defaults(func=_cmd_tune)

    p = sub.add_parser(
        "bench", help="time every kernel and peer per case against the floor; check; JSON, markdown, plots"
    )
    p.add_argument(
        "--models", default=None, help="comma list of presets (default: BENCHMARKS.md's; CPU: tiny-*)"
    )
    p.add_argument("--tokens", default=None, help="comma list of token counts (default 1,8,32,...,8192)")
    p.add_argument("--dtypes", default="bf16", help="comma list of activation dtypes (bf16, fp16, fp32)")
    p.add_argument(
        "--quant",
        default="none",
        help="comma list of quant schemes (none = bf16/fp16/fp32: unquantized; fp8, ...; or a full scheme such as fp8/w:per_tensor/a:fp8_per_tensor)",
    )
    p.add_argument("--kernels", default=None, help="comma list of experts kernels by name or dotted prefix")
    p.add_argument("--quick", action="store_true", help="the 3 smallest shapes at T = 1, 32, 512, 4096")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per case (default 30; CPU 10)")
    p.add_argument(
        "--vllm-peer",
        default=os.environ.get("MOE_BENCH_VLLM"),
        help="folder of the vLLM fused_moe peer package (default: $MOE_BENCH_VLLM; none: skipped)",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--out", default="moe-bench", help="folder for bench.json, bench.md and <shape>.png")
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("doctor", help="environment report (JSON)")
    p.set_defaults(func=_cmd_doctor)

    p = sub.add_parser("presets", help="model presets (JSON)")
    p.set_defaults(func=_cmd_presets)
    _add_plugin_commands(sub)
    return parser


def _add_plugin_commands(sub: Any) -> None:
    """Let each loaded plugin add its subcommands (hook ``register_commands``), one plugin at a time.

    A plugin whose hook raises is reported on stderr and whatever it added is
    taken back, so the other commands still work (strict mode: :class:`PluginError`).
    """
    manager = plugin_manager()
    for record in list(manager.records.values()):
        if record.status != "loaded" or "register_commands" not in record.hooks:
            continue
        parsers, actions = dict(sub._name_parser_map), list(sub._choices_actions)
        try:
            manager._call(record.name, "register_commands", subparsers=sub)
            replaced = sorted(n for n, p in parsers.items() if sub._name_parser_map.get(n) is not p)
            if replaced:  # argparse < 3.11 lets a duplicate name replace a command silently
                raise ValueError(f"command(s) {', '.join(replaced)} already exist")
        except Exception as exc:
            sub._name_parser_map.clear()
            sub._name_parser_map.update(parsers)
            sub._choices_actions[:] = actions
            if strict_plugins():
                raise PluginError(f"plugin {record.name!r}: register_commands failed: {exc}") from exc
            print(
                f"moe: plugin {record.name!r} could not add its commands "
                f"(register_commands raised {type(exc).__name__}: {exc}); skipped",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``moe``; returns the exit status."""
    try:
        parser = build_parser()
    except MoEError as exc:
        print(f"moe: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MoEError as exc:
        print(f"moe {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into a reader that closed early (`moe doctor | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
